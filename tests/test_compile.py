"""torch.compile: a compiled model, and a compiled optimizer step, with the package attached.

The package must add no graph, no graph break and no recompile (dynamo's own counters and its
recompile log, with against without the package, same steps), and measure what an eager run measures.
The aot_eager backend: the hooks meet dynamo, not the backend, and inductor's C++ builds would take
minutes of CI on two cores.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn

from tolaria_otel import SeedLayerSettings

from .helpers import seeded_network, telemetry_for

pytestmark = pytest.mark.slow

dynamo = pytest.importorskip("torch._dynamo")
from torch._dynamo.utils import counters  # noqa: E402

STEPS = 6


class Recompiles(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += "Recompiling function" in record.getMessage()


@pytest.fixture(autouse=True)
def no_process_wide_hooks() -> Iterator[None]:
    """Without the package means without: a process-wide hook another test left would be traced too."""
    from torch.optim.optimizer import _global_optimizer_post_hooks

    left = dict(_global_optimizer_post_hooks)
    _global_optimizer_post_hooks.clear()
    yield
    _global_optimizer_post_hooks.update(left)


@pytest.fixture
def recompiles() -> Iterator[Recompiles]:
    handler = Recompiles()
    torch._logging.set_logs(recompiles=True)  # type: ignore[attr-defined]  # public, re-exported without __all__
    logger = logging.getLogger("torch._dynamo")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
    torch._logging.set_logs()  # type: ignore[attr-defined]  # public, re-exported without __all__


def train(compiled: str, attach: str | None, settings: SeedLayerSettings, recompiles: Recompiles):
    """STEPS optimizer steps; (dynamo's counts, the summary) with the package attached as ``attach`` says."""
    dynamo.reset()
    counters.clear()
    recompiles.count = 0
    model, registry = seeded_network(2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    telemetry = None
    if attach is not None:
        telemetry, _ = telemetry_for(model, registry, settings)
        telemetry.attach(optimizer if attach == "optimizer" else None)
    forward = torch.compile(model, backend="aot_eager") if compiled == "model" else model
    step: Callable[[], object] = optimizer.step
    if compiled == "step":
        step = torch.compile(optimizer.step, backend="aot_eager")
    elif compiled == "step in a function":  # PyTorch's recipe for compiling the optimizer

        def optimizer_step() -> None:
            optimizer.step()

        step = torch.compile(optimizer_step, backend="aot_eager")

    def training_step(x: torch.Tensor, y: torch.Tensor) -> None:
        nn.functional.mse_loss(forward(x), y).backward()
        step()

    if compiled == "training step":  # forward, backward and step in one compiled function
        training_step = torch.compile(training_step, backend="aot_eager")
    generator = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        training_step(torch.randn(16, 32, generator=generator), torch.randn(16, 10, generator=generator))
        optimizer.zero_grad()
    counts = {
        "graph breaks": sum(counters["graph_break"].values()),
        "graphs": counters["stats"]["unique_graphs"],
        "recompiles": recompiles.count,
    }
    summary = telemetry.end_epoch() if telemetry is not None else None
    if telemetry is not None:
        telemetry.close()
    return counts, summary


@pytest.mark.parametrize(
    ("compiled", "attach", "sample_every"),
    [
        ("model", "optimizer", 1),
        ("step", "optimizer", 1),
        ("step", "every optimizer", 1),
        ("step in a function", "optimizer", 4),
        ("step in a function", "every optimizer", 4),
        ("training step", "optimizer", 1),
    ],
)
def test_the_package_adds_no_graph_break_or_recompile_and_measures_as_eager(
    compiled: str, attach: str, sample_every: int, recompiles: Recompiles
) -> None:
    settings = SeedLayerSettings(enabled=True, top_k=3, sample_every=sample_every)
    without, _ = train(compiled, None, settings, recompiles)
    with_package, summary = train(compiled, attach, settings, recompiles)
    assert with_package == without
    assert without["graphs"] >= 1  # something was compiled
    _, eager = train("nothing", attach, settings, recompiles)
    assert summary.sampled_steps == eager.sampled_steps == len(range(0, STEPS, sample_every))
    for seed_id, seed in eager.seeds.items():
        got = summary.seeds[seed_id]
        assert got.total_norm == pytest.approx(seed.total_norm, rel=1e-5)
        assert [layer for layer, _ in got.top_layers] == [layer for layer, _ in seed.top_layers]
        assert [v for _, v in got.top_layers] == pytest.approx([v for _, v in seed.top_layers], rel=1e-5)
