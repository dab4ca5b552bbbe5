"""Where the feature's time goes on workload (a), piece by piece (docs/benchmarks.md, "Fourth round").

Run: ``python -m benchmarks.step_path``. One process, one torch thread, the work-package's network with
4 seeds trained with SGD. At every step, on the same gradients, in an order rotated step by step, three
pieces are timed alone: the floor (``torch._foreach_norm`` over the seeds' gradients), the floor that
keeps its norms (the same plus a ``torch.stack``: what any statistic over steps needs at least), and
``observe_step()``; at every epoch end, ``end_epoch()``. Timing the pieces themselves, not whole epochs,
resolves a few µs where a 16 ms epoch drifts by hundreds on a shared machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import cast

import torch
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from tolaria_otel import SeedLayerSettings, SeedLayerTelemetry, seed_layer_views
from tolaria_otel.capture.optimizer_hooks import _StepHook
from tolaria_otel.demo.seeded_mlp import SeededMLP, SeedRegistry

SETTINGS = SeedLayerSettings(enabled=True)


def _timed(work: Callable[[], object]) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.step_path", description=__doc__)
    parser.add_argument("--epochs", type=int, default=300, help="epochs (default 300)")
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps per epoch (default 16, as in (a))")
    parser.add_argument("--quick", action="store_true", help="3 epochs: a smoke run, no figures")
    args = parser.parse_args()
    if args.quick:
        args.epochs = 3
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, registry = SeededMLP(), SeedRegistry()
    for i in range(4):
        registry.add(f"seed-{i}", model.graft(f"seed_{i}"), "TRAINING")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    provider = MeterProvider(metric_readers=[InMemoryMetricReader()], views=seed_layer_views(SETTINGS))
    telemetry = SeedLayerTelemetry(model, registry, settings=SETTINGS, meter_provider=provider)
    seed_params = [p for module in registry.modules.values() for p in module.parameters()]
    generator = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(32, 32, generator=generator), torch.randn(32, 10, generator=generator)) for _ in range(args.steps)
    ]
    kept: list[torch.Tensor] = []
    pieces: dict[str, Callable[[], object]] = {
        # Every parameter has a gradient when these run (after backward): Tensor.grad's Optional cannot say so.
        "floor: _foreach_norm": lambda: torch._foreach_norm(cast(list[torch.Tensor], [p.grad for p in seed_params])),
        "floor, norms kept: _foreach_norm + stack": lambda: kept.append(
            torch.stack(torch._foreach_norm(cast(list[torch.Tensor], [p.grad for p in seed_params])))
        ),
        "observe_step()": telemetry.observe_step,
    }
    names = list(pieces)
    # Per epoch, each piece's time summed over its steps (a flush every FLUSH_EVERY steps included), and
    # end_epoch(); the medians over the epochs, per step.
    epochs: dict[str, list[float]] = {name: [] for name in (*names, "end_epoch()")}
    step = 0
    for _ in range(args.epochs):
        kept.clear()
        spent = dict.fromkeys(names, 0.0)
        for x, y in batches:
            torch.nn.functional.mse_loss(model(x), y).backward()
            for name in names[step % 3 :] + names[: step % 3]:
                spent[name] += _timed(pieces[name])
            step += 1
            optimizer.step()
            optimizer.zero_grad()
        for name in names:
            epochs[name].append(spent[name] / args.steps)
        epochs["end_epoch()"].append(_timed(telemetry.end_epoch))

    per_step = {name: statistics.median(values) for name, values in epochs.items()}
    floor = per_step[names[0]]
    end_epoch = per_step.pop("end_epoch()")
    feature = statistics.median(
        step + end / args.steps for step, end in zip(epochs["observe_step()"], epochs["end_epoch()"])
    )
    print(f"| piece ({args.steps}-step epochs, {args.epochs} epochs, medians) | µs | × floor |\n| --- | ---: | ---: |")
    for name, value in per_step.items():
        print(f"| {name}, per step | {value * 1e6:.1f} | {value / floor:.2f} |")
    print(f"| end_epoch() | {end_epoch * 1e6:.0f} | |")
    print(
        f"| the feature per step: observe_step() + end_epoch() / {args.steps} | {feature * 1e6:.1f} | "
        f"{feature / floor:.2f} |"
    )

    # What attach(optimizer) adds to a step around observe_step(): the step post-hook's own call.
    hook = _StepHook(lambda _: None)
    calls = []
    for _ in range(20):
        start = time.perf_counter()
        for _ in range(1000):
            hook(optimizer, (), {})
        calls.append((time.perf_counter() - start) / 1000)
    print(f"\nattach(optimizer)'s step hook around observe_step(): {statistics.median(calls) * 1e6:.1f} µs per step")

    # What reading Kasmina's callable seed source costs a sampled step: one call and the identity check.
    segment = telemetry._seeds.current
    reads = []
    for _ in range(20):
        start = time.perf_counter()
        for _ in range(1000):
            segment.lists_same_modules(registry())
        reads.append((time.perf_counter() - start) / 1000)
    print(f"seed source read (call + identity check of 4 seeds): {statistics.median(reads) * 1e6:.1f} µs")


if __name__ == "__main__":
    main()
