"""Which of the package's modules one step's value passes through, from the clip to the exported point.

One sampled step is clipped with ``torch.nn.utils.clip_grad_norm_`` while attached, committed by the
optimizer's step, reduced by ``end_epoch()`` and read by a collection of an ``InMemoryMetricReader``. A *visit*
is a run of calls in one module, entered from another module (or from outside); the script prints the
visits in order and the modules visited more than once. ``python -m devtools.value_path``.
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from torch import nn

import tolaria_otel
from tolaria_otel import SeedLayerSettings, SeedLayerTelemetry, seed_layer_views

PACKAGE = Path(tolaria_otel.__file__).parent


def _module(frame: FrameType) -> str | None:
    path = Path(frame.f_code.co_filename)
    if PACKAGE not in path.parents:
        return None
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def trace(work: Any) -> list[str]:
    """The package's modules entered while ``work()`` runs, in order (a call from another module is an entry)."""
    entered: list[str] = []

    def profile(frame: FrameType, event: str, arg: object) -> None:
        if event != "call":
            return
        module = _module(frame)
        caller = frame.f_back
        if module is not None and (caller is None or _module(caller) != module):
            entered.append(module)

    sys.setprofile(profile)
    try:
        work()
    finally:
        sys.setprofile(None)
    return entered


def main() -> None:
    torch.manual_seed(0)
    seed = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    model = nn.Sequential(nn.Linear(8, 8), seed)
    settings = SeedLayerSettings(enabled=True, top_k=2)
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], views=seed_layer_views(settings))
    telemetry = SeedLayerTelemetry(
        model, lambda: {"seed-0": (seed, "TRAINING")}, settings=settings, meter_provider=provider
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    telemetry.attach(optimizer)
    model(torch.randn(4, 8)).square().sum().backward()

    def one_step() -> None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        telemetry.end_epoch()
        reader.get_metrics_data()

    entered = trace(one_step)
    telemetry.close()
    provider.shutdown()
    visits = [module for i, module in enumerate(entered) if i == 0 or entered[i - 1] != module]
    print("visits, in order:", " -> ".join(visits))
    counts = collections.Counter(visits)
    print(f"{len(counts)} modules, {len(visits)} visits; visited more than once:")
    for module, count in counts.most_common():
        if count > 1:
            print(f"  {module}: {count}")


if __name__ == "__main__":
    main()
