"""The step path's entry for norms a caller computed already (a clip computes every gradient's norm)."""

import math

import torch

from tolaria_otel import SeedLayerSettings, SeedLayerTelemetry
from tolaria_otel.measure.step_norms import FLUSH_EVERY, LIST_TENSORS_MAX, StepNorms

from .helpers import ReferenceNorms, seeded_network, train_epoch


def test_precomputed_norms_are_taken_as_given_and_missing_ones_count_as_no_gradient():
    params = [torch.nn.Parameter(torch.randn(3, 4)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn_like(p)
    norms = StepNorms(params, [(0, 0, None), (1, 0, None), (2, 1, None)], 2, torch.device("cpu"))
    given = {id(params[0]): torch.tensor(2.0), id(params[2]): torch.tensor(5.0)}  # params[1]: no gradient
    norms.add_step(given)
    rows = norms.take_rows()
    assert rows is not None
    assert rows.tolist() == [[4.0, 25.0]]  # what was given, not what the gradients hold
    assert norms.had_gradient() == [True, False, True]


def test_a_step_from_precomputed_norms_equals_the_measured_one():
    model, registry = seeded_network(2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    reference = ReferenceNorms(registry)
    telemetry = SeedLayerTelemetry(model, registry, settings=SeedLayerSettings(enabled=True))

    def from_precomputed():
        reference.hook(optimizer, (), {})
        grads = {id(p): torch.linalg.vector_norm(p.grad) for p in model.parameters() if p.grad is not None}
        telemetry._steps.observe(grads)

    train_epoch(model, optimizer, steps=5, generator=torch.Generator().manual_seed(1), before_step=from_precomputed)
    summary = telemetry.end_epoch()
    layers, totals = reference.epoch()
    for seed_id, seed in summary.seeds.items():
        assert seed.total_norm is not None and math.isclose(seed.total_norm, totals[seed_id], rel_tol=1e-5)
        for layer, value in seed.layer_norms.items():
            assert value is not None and math.isclose(value, layers[seed_id][layer], rel_tol=1e-5)


def test_above_list_tensors_max_the_norms_wait_in_a_buffer_and_give_the_same_rows():
    """Many gradient tensors: each step's norms are copied into a buffer (4 bytes per tensor-step); measured or
    precomputed, with gradients missing (adding 0), and more steps than the buffer's rows before the batch."""
    count = LIST_TENSORS_MAX + 6
    params = [torch.nn.Parameter(torch.randn(3)) for _ in range(count)]
    norms = StepNorms(params, [(i, i % 4, None) for i in range(count)], 4, torch.device("cpu"))
    assert all(group.buffer is not None for group in norms._groups)
    generator = torch.Generator().manual_seed(0)
    expected = []
    for step in range(FLUSH_EVERY + 3):
        for i, p in enumerate(params):
            p.grad = torch.randn(3, generator=generator) if (i + step) % 7 else None
        given = {id(p): torch.linalg.vector_norm(p.grad) for p in params if p.grad is not None} if step % 2 else None
        norms.add_step(given)
        expected.append(
            [
                sum(
                    float(p.grad.double().square().sum())
                    for i, p in enumerate(params)
                    if i % 4 == slot and p.grad is not None
                )
                for slot in range(4)
            ]
        )
    rows = norms.take_rows()
    assert rows is not None
    assert torch.allclose(rows.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5)
    assert norms.had_gradient() == [True] * count
