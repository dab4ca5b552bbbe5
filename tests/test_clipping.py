"""Measuring before the clip: a seed scaled by 1000 under global clipping at 1.0, in plain loops.

The reference is the gradients backprop produced, copied in float64 before any clip
(``framework_reference.PreClipGradients``); the clip's own reference is torch's ``clip_grad_norm_``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import cast

import pytest
import torch
from torch import nn

from tolaria_otel import EpochSummary, SeedLayerSettings, SeedLayerTelemetry
from tolaria_otel.demo.seeded_mlp import Seed, SeededMLP, SeedRegistry

from .framework_reference import PreClipGradients, assert_exploding_seed_epoch
from .helpers import metered, seeded_network
from .test_off_and_syncs import CountingMode

ON = SeedLayerSettings(enabled=True, top_k=3)
CLIP = 1.0
EXPLODING = 1000.0  # the exploding seed's branch is scaled by this
STEPS = 6
ACCUMULATE = 2


def exploding_network() -> tuple[SeededMLP, SeedRegistry]:
    """Three seeds; the last one's branch scaled by 1000 (the last, so that its blow-up is not the others'
    input): its gradient before clipping is about 1e3 to 2e3, the others' about 10 to 150."""
    model, registry = seeded_network(3)
    cast(Seed, model.seeds["seed_2"]).alpha = EXPLODING  # a ModuleDict item is typed as any Module
    return model, registry


def loss_of(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over the outputs, averaged over the batch."""
    return (output - target).square().sum(dim=1).mean()


def batches(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(32, 32, generator=generator), torch.randn(32, 10, generator=generator)


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    clip: Callable[[Iterator[nn.Parameter], float], object],
    *,
    steps: int = STEPS,
    commit: Callable[[], object] | None = None,
) -> None:
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for _ in range(ACCUMULATE):
            x, y = batches(generator)
            (loss_of(model(x), y) / ACCUMULATE).backward()
        clip(model.parameters(), CLIP)
        optimizer.step()
        if commit is not None:
            commit()
        optimizer.zero_grad()


def check_against(summary: EpochSummary | None, reference: PreClipGradients) -> None:
    assert summary is not None
    layers, totals, steps, factors = reference.epoch()
    assert_exploding_seed_epoch(summary, layers, totals, factors)
    assert {seed_id: seed.sampled_steps for seed_id, seed in summary.seeds.items()} == steps


@pytest.mark.parametrize("how", ["telemetry.clip_grad_norm_", "torch.nn.utils.clip_grad_norm_ while attached"])
def test_plain_loop_measures_before_clipping(how: str) -> None:
    before = torch.nn.utils.clip_grad_norm_  # torch's, or the patch of a telemetry another test left attached
    model, registry = exploding_network()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-9)  # tiny steps: the gradients stay alike
    reference = PreClipGradients(model, optimizer, registry, CLIP)
    telemetry = SeedLayerTelemetry(model, registry, settings=ON, meter_provider=metered(ON)[0])
    if how == "telemetry.clip_grad_norm_":
        train(model, optimizer, telemetry.clip_grad_norm_, commit=telemetry.observe_step)
    else:
        telemetry.attach(optimizer)
        # Looked up at each call, as a user's loop does: the function attach() patched is the one that runs.
        train(model, optimizer, lambda params, max_norm: torch.nn.utils.clip_grad_norm_(params, max_norm))  # noqa: PLW0108
    check_against(telemetry.end_epoch(), reference)
    telemetry.close()
    assert torch.nn.utils.clip_grad_norm_ is before  # restored at close


def test_attach_without_optimizer_and_a_value_clip_measure_before_clipping() -> None:
    """``attach()`` (every optimizer of the model), and a clip whose norms cannot be shared (by value):
    measured just before it."""
    before = torch.nn.utils.clip_grad_value_
    model, registry = exploding_network()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-9)
    reference = PreClipGradients(model, optimizer, registry, CLIP)
    telemetry = SeedLayerTelemetry(model, registry, settings=ON, meter_provider=metered(ON)[0])
    telemetry.attach()
    try:
        train(model, optimizer, lambda params, _: torch.nn.utils.clip_grad_value_(params, 1e-3))
        summary = telemetry.end_epoch()
    finally:
        telemetry.close()
    _, totals, _, _ = reference.epoch()
    for seed_id, seed in summary.seeds.items():
        assert seed.total_norm == pytest.approx(totals[seed_id], rel=1e-5)
    assert summary.seeds["seed-2"].health == "exploding"
    assert summary.clip_steps == 0 and summary.min_clip_factor is None  # a value clip has no factor
    assert torch.nn.utils.clip_grad_value_ is before


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("max_norm", [0.5, 1e6, float("inf")])
@pytest.mark.parametrize("foreach", [None, False])
def test_measure_and_clip_returns_and_clips_as_torch(dtype: torch.dtype, max_norm: float, foreach: bool | None) -> None:
    """Bit for bit torch's clip on float32 and float64 gradients: same total, same clipped gradients."""
    model, registry = exploding_network()
    model = model.to(dtype)
    twin = [p.detach().clone().requires_grad_() for p in model.parameters()]
    x, y = batches(torch.Generator().manual_seed(3))
    nn.functional.mse_loss(model(x.to(dtype)), y.to(dtype)).backward()
    for p, q in zip(model.parameters(), twin):
        q.grad = p.grad.clone()
    twin[5].grad = None  # a parameter without a gradient is skipped by both
    list(model.parameters())[5].grad = None
    telemetry = SeedLayerTelemetry(model, registry, settings=ON, meter_provider=metered(ON)[0])
    ours = telemetry.clip_grad_norm_(model.parameters(), max_norm, foreach=foreach)
    theirs = torch.nn.utils.clip_grad.clip_grad_norm_(twin, max_norm, foreach=foreach)
    assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)
    for p, q in zip(model.parameters(), twin):
        if q.grad is not None:
            assert p.grad is not None and torch.equal(p.grad, q.grad)
    telemetry.observe_step()
    assert telemetry.end_epoch().clip_steps == 1


def test_half_precision_gradients_are_normed_in_float32() -> None:
    """Where the measured clip differs from torch's: bfloat16 gradients are normed in float32 here (the
    telemetry accumulates float32), in bfloat16 by torch; the totals agree to bfloat16's precision."""
    model, registry = exploding_network()
    model = model.to(torch.bfloat16)
    twin = [p.detach().clone().requires_grad_() for p in model.parameters()]
    x, y = batches(torch.Generator().manual_seed(3))
    nn.functional.mse_loss(model(x.bfloat16()), y.bfloat16()).backward()
    for p, q in zip(model.parameters(), twin):
        q.grad = p.grad.clone()
    exact = torch.linalg.vector_norm(torch.stack([p.grad.double().norm() for p in model.parameters()]))
    telemetry = SeedLayerTelemetry(model, registry, settings=ON, meter_provider=metered(ON)[0])
    ours = telemetry.clip_grad_norm_(model.parameters(), CLIP)
    theirs = torch.nn.utils.clip_grad.clip_grad_norm_(twin, CLIP)
    assert ours.dtype == torch.float32 and theirs.dtype == torch.bfloat16
    assert float(ours) == pytest.approx(float(exact), rel=1e-5)
    assert float(theirs) == pytest.approx(float(exact), rel=2**-7)


def test_a_step_the_grad_scaler_skips_is_not_counted() -> None:
    """The clip's norms wait for the optimizer step: a step GradScaler skips (inf found) never commits
    them, and the next step measures its own gradients, not the skipped step's."""
    model, registry = exploding_network()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-9)
    reference = PreClipGradients(model, optimizer, registry, CLIP)
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    telemetry = SeedLayerTelemetry(model, registry, settings=ON, meter_provider=metered(ON)[0])
    telemetry.attach(optimizer)
    generator = torch.Generator().manual_seed(1)
    try:
        for step in range(4):
            x, y = batches(generator)
            scaler.scale(loss_of(model(x), y)).backward()
            if step == 1:
                grad = model.get_parameter("seeds.seed_0.net.0.weight").grad
                assert grad is not None
                grad[0, 0] = float("inf")
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            scaler.step(optimizer)
            scaler.update(1.0)  # a scale of 1 throughout: the reference copies the gradients as backward left them
            optimizer.zero_grad()
        summary = telemetry.end_epoch()
    finally:
        telemetry.close()
    _, totals, steps, _ = reference.epoch()
    assert summary.sampled_steps == steps["seed-0"] == 3 and summary.clip_steps == 3
    assert summary.seeds["seed-0"].nonfinite_steps == 0
    for seed_id, seed in summary.seeds.items():
        assert seed.total_norm == pytest.approx(totals[seed_id], rel=1e-5)


def test_two_trainers_in_one_process_each_take_their_own_clips() -> None:
    before = torch.nn.utils.clip_grad_norm_
    first, first_seeds = exploding_network()
    second, second_seeds = seeded_network(2, seed=5)
    provider = metered(ON)[0]
    telemetries = [
        SeedLayerTelemetry(model, seeds, settings=ON, meter_provider=provider, attributes={"env_id": str(i)})
        for i, (model, seeds) in enumerate([(first, first_seeds), (second, second_seeds)])
    ]
    optimizers = [torch.optim.SGD(model.parameters(), lr=1e-9) for model in (first, second)]
    references = [
        PreClipGradients(model, optimizer, seeds, CLIP)
        for model, optimizer, seeds in zip((first, second), optimizers, (first_seeds, second_seeds))
    ]
    for telemetry, optimizer in zip(telemetries, optimizers):
        telemetry.attach(optimizer)
    train(first, optimizers[0], torch.nn.utils.clip_grad_norm_, steps=2)
    telemetries[0].close()  # the second still has the patch
    assert torch.nn.utils.clip_grad_norm_ is not torch.nn.utils.clip_grad.clip_grad_norm_
    train(second, optimizers[1], torch.nn.utils.clip_grad_norm_, steps=3)
    summary = telemetries[1].end_epoch()
    telemetries[1].close()
    assert torch.nn.utils.clip_grad_norm_ is before
    _, totals, _, factors = references[1].epoch()
    assert summary.sampled_steps == 3 and summary.clip_steps == 3
    assert summary.min_clip_factor == pytest.approx(min(factors), rel=1e-5)
    for seed_id, seed in summary.seeds.items():
        assert seed.total_norm == pytest.approx(totals[seed_id], rel=1e-5)


def test_measured_clip_adds_no_host_sync_and_no_norm() -> None:
    """The step path of a clipped run: no host read, and the clip's foreach norm is the only one."""
    model, registry = seeded_network(4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    telemetry = SeedLayerTelemetry(model, registry, settings=ON, meter_provider=metered(ON)[0])
    steps = 128
    with CountingMode() as measured:
        train(model, optimizer, telemetry.clip_grad_norm_, steps=steps, commit=telemetry.observe_step)
    with CountingMode() as clip_alone:
        train(model, optimizer, torch.nn.utils.clip_grad.clip_grad_norm_, steps=steps)
    with CountingMode() as epoch_end:
        summary = telemetry.end_epoch()
    assert measured.host_transfers == 0
    assert measured.ops.count("aten::_foreach_norm") == clip_alone.ops.count("aten::_foreach_norm") == steps
    # No op per step: what the measured clip adds is the batch every FLUSH_EVERY (64) sampled steps.
    assert len(measured.ops) - len(clip_alone.ops) < steps
    assert epoch_end.host_transfers <= 2  # the statistics, and the clip facts of an epoch that clipped
    assert summary.clip_steps == steps


def test_an_unreachable_clip_is_named_once(caplog: pytest.LogCaptureFixture) -> None:
    model, registry = seeded_network(1)
    settings = ON
    with caplog.at_level(logging.WARNING, logger="tolaria_otel"):
        from tolaria_otel.capture.torch_clip import _warned

        _warned.clear()
        for _ in range(2):
            telemetry = SeedLayerTelemetry(model, registry, settings=settings, meter_provider=metered(ON)[0])
            telemetry._attach_clip(deepspeed=True)
            telemetry.close()
    messages = [r.getMessage() for r in caplog.records if "DeepSpeed" in r.getMessage()]
    assert len(messages) == 1 and "gradient_clipping to 0" in messages[0]


def test_clip_facts_are_exported_as_the_trainers_gauges() -> None:
    from tolaria_otel.export.instruments import CLIP_STEPS, CLIPPED_STEPS, MIN_CLIP_FACTOR

    from .helpers import collect

    model, registry = exploding_network()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-9)
    reference = PreClipGradients(model, optimizer, registry, CLIP)
    provider, reader = metered(ON)
    telemetry = SeedLayerTelemetry(model, registry, settings=ON, meter_provider=provider, attributes={"env_id": "7"})
    telemetry.attach(optimizer)
    train(model, optimizer, torch.nn.utils.clip_grad_norm_)
    telemetry.end_epoch()
    *_, factors = reference.epoch()
    exported = collect(reader)
    assert exported[CLIP_STEPS] == exported[CLIPPED_STEPS] == [({"env_id": "7"}, STEPS, "")]
    ((attributes, value, _),) = exported[MIN_CLIP_FACTOR]
    assert attributes == {"env_id": "7"} and value == pytest.approx(min(factors), rel=1e-5)
    train(model, optimizer, lambda params, max_norm: None)  # an epoch without a clip exports no clip facts
    telemetry.end_epoch()
    exported = collect(reader)
    assert not exported.get(CLIP_STEPS) and not exported.get(MIN_CLIP_FACTOR)
    telemetry.close()


@pytest.mark.slow
def test_the_clip_benchmark_runs_every_variant() -> None:
    from benchmarks.clipping import report, variants
    from benchmarks.overhead import seeded_mlp_workload

    table = report(seeded_mlp_workload(samples=64), rounds=1, epochs=1)
    rows = [line.split("|")[1].strip() for line in table.splitlines()[3:]]
    assert rows == [variant.name for variant in variants()]  # timings are printed, never asserted


@pytest.mark.parametrize("kind", ["norm", "value"])
@pytest.mark.parametrize("where", ["before", "between", "after"])
def test_a_clip_of_parameters_without_gradient_leaves_the_step_as_measured(where: str, kind: str) -> None:
    """Esper clips the host and then each slot on its own, a GERMINATED seed (outside the graph, no gradient)
    included: that clip scales nothing, and the step keeps the norms the others took before they scaled
    (by value too: each group's clip measures before it, and a gradient keeps the norm measured first)."""
    model, registry = exploding_network()
    germinated = model.graft("seed_3")
    germinated.in_graph = False
    registry.add("seed-3", germinated, "GERMINATED")
    host = [param for name, param in model.named_parameters() if not name.startswith("seeds.")]
    groups = [host] + [list(model.seeds[f"seed_{i}"].parameters()) for i in range(3)]
    groups.insert({"before": 0, "between": 2, "after": len(groups)}[where], list(germinated.parameters()))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-9)
    reference = PreClipGradients(model, optimizer, registry, CLIP)
    host_module = nn.ModuleList([model.stem, model.head])  # the host's parameters, for the reference
    host_reference = PreClipGradients(model, optimizer, lambda: {"host": (host_module, "")}, CLIP)
    settings = SeedLayerSettings(enabled=True, top_k=3, host_norm=True)
    telemetry = SeedLayerTelemetry(model, registry, settings=settings, meter_provider=metered(settings)[0])
    telemetry.attach(optimizer)

    def clip_each_group(params: object, max_norm: float) -> None:
        for group in groups:
            if kind == "norm" or group[0].grad is None:  # torch's value clip refuses a group without gradient
                torch.nn.utils.clip_grad_norm_(group, max_norm)
            else:
                torch.nn.utils.clip_grad_value_(group, 1e-3)

    try:
        train(model, optimizer, clip_each_group)
        summary = telemetry.end_epoch()
    finally:
        telemetry.close()
    assert summary is not None
    layers, totals, _, _ = reference.epoch()
    for seed_id in ("seed-0", "seed-1", "seed-2"):
        seed = summary.seeds[seed_id]
        assert seed.total_norm == pytest.approx(totals[seed_id], rel=1e-5)
        for layer, value in seed.layer_norms.items():
            assert value == pytest.approx(layers[seed_id][layer], rel=1e-5)
    assert summary.seeds["seed-2"].health == "exploding"
    assert summary.seeds["seed-3"].total_norm is None  # no gradient: not measured, never 0.0
    assert summary.host_norm == pytest.approx(host_reference.epoch()[1]["host"], rel=1e-5)
    if kind == "norm":  # the groups with a gradient were scaled (a value clip has no factor)
        assert summary.clip_steps == summary.clipped_steps == STEPS


def test_a_seed_germinated_after_the_epochs_first_clip_is_measured_before_its_own_clip() -> None:
    """Its first parameter is new to the clip patch mid-epoch: the patch looks once more and takes its clip."""
    model, registry = seeded_network(2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-9)
    reference = PreClipGradients(model, optimizer, registry, CLIP)
    telemetry = SeedLayerTelemetry(model, registry, settings=ON, meter_provider=metered(ON)[0])
    telemetry.attach(optimizer)
    grafted: list[nn.Module] = []

    def clip_each_group(params: object, max_norm: float) -> None:
        if len(grafted) == 0 and len(reference.factors) == 2:  # after two steps: germinate, exploding
            seed = model.graft("seed_2")
            seed.alpha = EXPLODING
            optimizer.add_param_group({"params": list(seed.parameters())})
            reference.handles.extend(p.register_post_accumulate_grad_hook(reference._copy) for p in seed.parameters())
            registry.add("seed-2", seed, "GERMINATED")
            grafted.append(seed)
        host = [param for name, param in model.named_parameters() if not name.startswith("seeds.")]
        for group in [host, *(list(seed.parameters()) for seed in model.seeds.values())]:
            torch.nn.utils.clip_grad_norm_(group, max_norm)

    try:
        train(model, optimizer, clip_each_group)
        summary = telemetry.end_epoch()
    finally:
        telemetry.close()
    assert summary is not None
    _, totals, steps, _ = reference.epoch()
    assert summary.seeds["seed-2"].sampled_steps == steps["seed-2"] == STEPS - 2
    for seed_id, seed in summary.seeds.items():
        assert seed.total_norm == pytest.approx(totals[seed_id], rel=1e-5), seed_id
    assert (summary.seeds["seed-2"].total_norm or 0.0) > 10 * CLIP  # before its clip, which scales it to 1
