"""attach(optimizer) on what frameworks hand out: closure steps, GradScaler, accelerate's
AcceleratedOptimizer, ZeroRedundancyOptimizer on a one-process gloo group (and the process-wide
attach() there). Values against the gradients each step used."""

from __future__ import annotations

import types
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
from torch import nn

from tolaria_otel import EpochSummary, SeedLayerSettings

from .helpers import ReferenceNorms, expected_top_k, metered, seeded_network, telemetry_for

ON = SeedLayerSettings(enabled=True, top_k=3)


def assert_matches(summary, reference: ReferenceNorms) -> None:
    layers, totals = reference.epoch()
    assert set(summary.seeds) == set(totals)
    for seed_id, seed in summary.seeds.items():
        assert seed.total_norm == pytest.approx(totals[seed_id], rel=1e-5)
        want = expected_top_k(layers[seed_id], ON.top_k)
        assert [layer for layer, _ in seed.top_layers] == [layer for layer, _ in want]
        assert [value for _, value in seed.top_layers] == pytest.approx([v for _, v in want], rel=1e-5)


def closure_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    steps: int,
    *,
    micro_batches: int,
    on_backward_done: Callable[[], object] | None = None,
) -> None:
    """Lightning's way: every micro-batch's forward and backward run inside ``step(closure)``."""
    generator = torch.Generator().manual_seed(3)

    def closure() -> torch.Tensor:
        inner = optimizer if isinstance(optimizer, torch.optim.Optimizer) else None
        (inner or optimizer).zero_grad()
        for _ in range(micro_batches):
            x, y = torch.randn(8, 32, generator=generator), torch.randn(8, 10, generator=generator)
            loss = nn.functional.mse_loss(model(x), y) / micro_batches
            loss.backward()
        if on_backward_done is not None:
            on_backward_done()
        return loss

    for _ in range(steps):
        optimizer.step(closure)  # type: ignore[arg-type]  # torch types a closure's loss as float; it is a Tensor


@pytest.mark.parametrize("max_iter", [1, 3])
def test_lbfgs_is_measured_on_the_gradients_of_its_last_closure_evaluation(max_iter: int) -> None:
    model, registry = seeded_network(2)
    optimizer = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=max_iter)
    telemetry, _ = telemetry_for(model, registry, ON)
    telemetry.attach(optimizer)
    reference = ReferenceNorms(registry)
    last: list[dict[int, torch.Tensor]] = []

    def remember() -> None:  # the gradients of this evaluation; the step's last one is what counts
        last.append({id(p): p.grad.detach().clone() for p in model.parameters()})

    for _ in range(3):
        last.clear()
        closure_steps(model, optimizer, 1, micro_batches=2, on_backward_done=remember)
        assert (len(last) == 1) == (max_iter == 1)  # max_iter > 1: the closure ran again after an update
        saved = {id(p): p.grad for p in model.parameters()}
        for p in model.parameters():
            p.grad = last[-1][id(p)]
        reference.hook(optimizer, (), {})
        for p in model.parameters():
            p.grad = saved[id(p)]
    summary = telemetry.end_epoch()
    assert summary.sampled_steps == 3
    assert_matches(summary, reference)


def test_a_step_pre_hook_would_miss_the_closure_which_the_package_does_not() -> None:
    model, registry = seeded_network(2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    telemetry, _ = telemetry_for(model, registry, ON)
    telemetry.attach(optimizer)
    after = ReferenceNorms(registry)
    optimizer.register_step_post_hook(after.hook)
    before = ReferenceNorms(registry)  # what a pre-hook sees: the previous step's gradients, or none
    optimizer.register_step_pre_hook(before.hook)
    closure_steps(model, optimizer, 4, micro_batches=4)
    summary = telemetry.end_epoch()
    assert summary.sampled_steps == 4
    wrong = before.epoch()[1]
    assert_matches(summary, after)
    assert all(summary.seeds[s].total_norm != pytest.approx(wrong.get(s, 0.0), rel=1e-2) for s in summary.seeds)


def accelerated_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    accelerate = pytest.importorskip("accelerate")
    accelerate.Accelerator(cpu=True)  # the gradient state the wrapper reads
    return accelerate.optimizer.AcceleratedOptimizer(optimizer, device_placement=False)


def test_accelerate_wrapper_is_unwrapped_and_measured_exactly() -> None:  # LightningOptimizer: test_lightning
    model, registry = seeded_network(2)
    inner = torch.optim.SGD(model.parameters(), lr=0.01)
    wrapped = accelerated_optimizer(inner)
    telemetry, _ = telemetry_for(model, registry, ON)
    telemetry.attach(wrapped)
    reference = ReferenceNorms(registry)
    inner.register_step_post_hook(reference.hook)
    closure_steps(model, wrapped, 3, micro_batches=2)
    summary = telemetry.end_epoch()
    assert summary.sampled_steps == 3
    assert_matches(summary, reference)


def test_a_wrapper_without_an_optimizer_inside_is_a_type_error_naming_it() -> None:
    model, registry = seeded_network(1)
    telemetry, _ = telemetry_for(model, registry, ON)
    with pytest.raises(
        TypeError,
        match=r"attach\(\) got SimpleNamespace: expected a torch.optim.Optimizer or a "
        r"wrapper with one in its .optimizer attribute",
    ):
        telemetry.attach(types.SimpleNamespace(optimizer=types.SimpleNamespace(optimizer="sgd")))


@pytest.fixture
def one_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")  # torch.distributed's own TorchScript
@pytest.mark.parametrize("attach", ["optimizer", "every_optimizer"])
def test_zero_redundancy_optimizer_counts_each_step_once(one_process_group, attach: str) -> None:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    model, registry = seeded_network(2)
    zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.SGD, lr=0.01)
    telemetry, _ = telemetry_for(model, registry, ON)
    telemetry.attach(zero if attach == "optimizer" else None)  # attach(): ZeRO's step and its inner one, counted once
    reference = ReferenceNorms(registry)
    zero.register_step_post_hook(reference.hook)
    closure_steps(model, zero, 3, micro_batches=2)
    summary = telemetry.end_epoch()
    assert summary.sampled_steps == 3
    assert_matches(summary, reference)
    telemetry.close()


def test_grad_scaler_steps_are_measured_unscaled_and_skipped_steps_not_at_all() -> None:
    model, registry = seeded_network(2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    telemetry, _ = telemetry_for(model, registry, ON)
    telemetry.attach(optimizer)
    reference = ReferenceNorms(registry)
    optimizer.register_step_post_hook(reference.hook)  # runs only for steps the scaler lets through
    generator = torch.Generator().manual_seed(4)
    for step in range(4):
        x, y = torch.randn(8, 32, generator=generator), torch.randn(8, 10, generator=generator)
        if step == 1:
            x[0, 0] = float("inf")  # an overflow: the scaler skips this step
        scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
        scaler.unscale_(optimizer)
        # A clip that never scales: the reference reads .grad after it (before-clip values: test_clipping.py).
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e6)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
    summary = telemetry.end_epoch()
    assert summary.sampled_steps == reference.steps == 3
    assert_matches(summary, reference)
    assert all(seed.total_norm is not None and seed.total_norm < 1.0 for seed in summary.seeds.values())  # not x4096
    assert summary.clip_steps == 3 and summary.clipped_steps == 0 and summary.min_clip_factor == 1.0


def test_a_framework_optimizer_with_no_torch_optimizer_inside_is_measured_by_the_process_wide_hook() -> None:
    from tolaria_otel.integrations.framework_run import FrameworkRun, RunOptions

    model, registry = seeded_network(1)
    summaries: list[EpochSummary] = []
    options = RunOptions(registry, ON, metered(ON)[0], None, None, None, summaries.append)
    run = FrameworkRun(model, [types.SimpleNamespace(step=lambda: None)], options)  # DeepSpeed's own, say
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    closure_steps(model, optimizer, 2, micro_batches=1)
    run.close()
    assert [s.sampled_steps for s in summaries] == [2]
