"""Where the feature's time goes on workload (a), piece by piece (docs/benchmarks.md, "Second round").

Run: ``python -m benchmarks.step_path``. One process, the variants interleaved epoch by epoch, one torch
thread; prints the extra time per optimizer step over the plain loop (median of the epochs) and
``end_epoch()`` alone.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from tolaria_otel import SeedLayerSettings, SeedLayerTelemetry, seed_layer_views
from tolaria_otel.seeded_mlp import SeededMLP, SeedRegistry

SETTINGS = SeedLayerSettings(enabled=True)
STEPS = 16  # 512 samples, batch 32


def _trainer(variant: str) -> Callable[[], float]:
    torch.manual_seed(0)
    model, registry = SeededMLP(), SeedRegistry()
    for i in range(4):
        registry.add(f"seed-{i}", model.graft(f"seed_{i}"), "TRAINING")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    provider = MeterProvider(metric_readers=[InMemoryMetricReader()], views=seed_layer_views(SETTINGS))
    telemetry = SeedLayerTelemetry(model, registry, settings=SETTINGS, meter_provider=provider)
    seed_params = [p for module in registry.modules.values() for p in module.parameters()]
    if variant in ("attached, no end_epoch", "attached, with end_epoch"):
        telemetry.attach(optimizer)
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(32, 32, generator=generator), torch.randn(32, 10, generator=generator))
               for _ in range(STEPS)]

    kept: list[torch.Tensor] = []

    def epoch() -> float:
        kept.clear()
        start = time.perf_counter()
        for x, y in batches:
            torch.nn.functional.mse_loss(model(x), y).backward()
            if variant == "floor: _foreach_norm only":
                torch._foreach_norm([p.grad for p in seed_params])
            elif variant == "floor, norms kept: _foreach_norm + stack":
                kept.append(torch.stack(torch._foreach_norm([p.grad for p in seed_params])))
            elif variant == "observe_step(), no end_epoch":
                telemetry.observe_step()
            optimizer.step()
            optimizer.zero_grad()
        if variant == "attached, with end_epoch":
            telemetry.end_epoch()
        return time.perf_counter() - start

    return epoch


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.step_path", description=__doc__)
    parser.add_argument("--epochs", type=int, default=300, help="epochs per variant (default 300)")
    parser.add_argument("--quick", action="store_true", help="3 epochs per variant: a smoke run, no figures")
    args = parser.parse_args()
    if args.quick:
        args.epochs = 3
    torch.set_num_threads(1)
    variants = ["baseline", "floor: _foreach_norm only", "floor, norms kept: _foreach_norm + stack",
                "observe_step(), no end_epoch", "attached, no end_epoch", "attached, with end_epoch"]
    epochs = {name: _trainer(name) for name in variants}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.epochs):
        for name in variants:
            times[name].append(epochs[name]())
    base = statistics.median(times["baseline"])
    print("| variant | extra µs per step |\n| --- | ---: |")
    for name in variants[1:]:
        print(f"| {name} | {(statistics.median(times[name]) - base) / STEPS * 1e6:+.1f} |")

    torch.manual_seed(0)
    model, registry = SeededMLP(), SeedRegistry()
    for i in range(4):
        registry.add(f"seed-{i}", model.graft(f"seed_{i}"), "TRAINING")
    telemetry = SeedLayerTelemetry(model, registry, settings=SETTINGS, meter_provider=MeterProvider())
    model(torch.randn(32, 32)).sum().backward()
    samples = []
    for _ in range(20):
        start = time.perf_counter()
        for _ in range(50):
            telemetry.observe_step()
            telemetry.end_epoch()
        samples.append((time.perf_counter() - start) / 50)
    print(f"\nend_epoch() with one sampled step: {statistics.median(samples) * 1e6:.0f} µs (observe_step included)")
    samples = []
    for _ in range(args.epochs):
        for _ in range(STEPS):
            telemetry.observe_step()
        start = time.perf_counter()
        telemetry.end_epoch()
        samples.append(time.perf_counter() - start)
    print(f"end_epoch() after {STEPS} sampled steps: {statistics.median(samples) * 1e6:.0f} µs")

    # What reading Kasmina's callable seed source costs a sampled step: one call and the identity check.
    segment = telemetry._current
    reads = []
    for _ in range(20):
        start = time.perf_counter()
        for _ in range(1000):
            segment.lists_same_modules(registry())
        reads.append((time.perf_counter() - start) / 1000)
    print(f"seed source read (call + identity check of 4 seeds): {statistics.median(reads) * 1e6:.1f} µs")


if __name__ == "__main__":
    main()
