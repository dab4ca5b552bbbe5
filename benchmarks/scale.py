"""How the feature's costs grow with seeds and layers (docs/benchmarks.md, "Scale"; issue 18).

Run: ``python -m benchmarks.scale`` (``--quick``: a smoke run at small sizes, no figures). One process,
one torch thread. Per size, S seeds of L ``Linear(8, 8)`` layers (2 gradient tensors each: weight and
bias) whose gradients are set once; then, for a few epochs, at each step on the same gradients and in
alternating order: the floor (one ``torch._foreach_norm`` over every seed gradient) and
``observe_step()``; at each epoch end ``end_epoch()`` and one collection by an ``InMemoryMetricReader``.
Each size runs in a process of its own, so that the RSS one size freed does not hide the next one's.
Printed per size, from one run: observe_step's median against the floor's, and its mean (the flushes
included: what the feature costs over an epoch's steps) against the floor's; the flushing step (every
``FLUSH_EVERY``-th sampled step, median over the flushes) against the median step; the slowest step
against the median, of observe_step and of the floor (on a shared machine the floor's says how much of
it is the machine's noise); end_epoch; the RSS the step path held at its peak in the first epoch after a
warm-up (the waiting norms); and the points exported per collection. Read the ratios, measured side
by side, rather than the times. end_epoch is given as the median and the mean over the epochs, with the
mean time the garbage collector ran inside it: a full collection lands in one epoch end and not the next.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from typing import cast

import torch
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from torch import nn

from tolaria_otel import SeedLayerSettings, SeedLayerTelemetry, seed_layer_views
from tolaria_otel.measure.step_norms import FLUSH_EVERY

SETTINGS = SeedLayerSettings(enabled=True)
#: (seeds, layers per seed): the work-package's size up to 10,240 gradient tensors, and one-layer seeds.
GRID = ((4, 3), (16, 8), (64, 20), (256, 20), (125, 1), (500, 1), (2000, 1))
QUICK_GRID = ((4, 3), (16, 8), (125, 1))
WIDTH = 8
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * _PAGE


def _points(reader: InMemoryMetricReader) -> int:
    data = reader.get_metrics_data()
    if data is None:
        return 0
    return sum(
        len(metric.data.data_points)
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
    )


class GarbageCollections:
    """Time spent in Python's garbage collector while ``on``: a full collection, triggered by the objects an
    epoch end leaves alive, traverses every object of the process, and lands in whichever epoch it falls."""

    def __init__(self) -> None:
        self.on = False
        self.spent = 0.0
        self._start = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if not self.on:
            return
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.spent += time.perf_counter() - self._start


def measure(seeds: int, layers: int, epochs: int, steps: int) -> dict[str, float]:
    torch.manual_seed(0)
    modules = {f"seed-{i:04d}": nn.Sequential(*(nn.Linear(WIDTH, WIDTH) for _ in range(layers))) for i in range(seeds)}
    model = nn.ModuleDict({seed_id.replace("-", "_"): module for seed_id, module in modules.items()})
    grads = [p for module in modules.values() for p in module.parameters()]
    for p in grads:
        p.grad = torch.randn_like(p)
    source = {seed_id: (module, "TRAINING") for seed_id, module in modules.items()}
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], views=seed_layer_views(SETTINGS))
    telemetry = SeedLayerTelemetry(model, source, settings=SETTINGS, meter_provider=provider)
    floor_times: list[float] = []
    step_times: list[float] = []
    end_times: list[float] = []
    held = 0
    points = 0
    collections = GarbageCollections()
    for _ in range(2):  # warm-up, not timed: first calls of each op, the SDK's first collection
        telemetry.observe_step()
    telemetry.end_epoch()
    _points(reader)
    for epoch in range(epochs):
        gc.collect()
        start_rss = _rss()
        for step in range(steps):
            order = (0, 1) if step % 2 else (1, 0)
            for piece in order:
                start = time.perf_counter()
                if piece:
                    telemetry.observe_step()
                else:
                    torch._foreach_norm(cast(list[torch.Tensor], [p.grad for p in grads]))  # all set by backward
                (step_times if piece else floor_times).append(time.perf_counter() - start)
            if epoch == 0:
                held = max(held, _rss() - start_rss)
        collections.on = True
        start = time.perf_counter()
        telemetry.end_epoch()
        end_times.append(time.perf_counter() - start)
        collections.on = False
        points = _points(reader)
    telemetry.close()
    provider.shutdown()
    median = statistics.median(step_times)
    floor = statistics.median(floor_times)
    flushes = [t for i, t in enumerate(step_times) if (i % steps + 1) % FLUSH_EVERY == 0]
    return {
        "tensors": len(grads),
        "observe": median,
        "floor": floor,
        "mean": statistics.fmean(step_times) / statistics.fmean(floor_times),
        "flush": statistics.median(flushes) / median,
        "slowest": max(step_times) / median,
        "floor_slowest": max(floor_times) / floor,
        "end_epoch": statistics.median(end_times),
        "end_epoch_mean": statistics.fmean(end_times),
        "end_epoch_gc": collections.spent / epochs,
        "held": held,
        "points": points,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per size (default 3)")
    parser.add_argument("--steps", type=int, default=128, help="sampled steps per epoch (default 128: two flushes)")
    parser.add_argument("--quick", action="store_true", help="small sizes, 2 epochs of 70 steps: a smoke run")
    parser.add_argument("--sizes", help="SEEDSxLAYERS,... instead of the grid (default: 4x3 up to 256x20 and 2000x1)")
    parser.add_argument("--size", help=argparse.SUPPRESS)  # SEEDSxLAYERS: one size, measured in this process
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.steps = 2, 70
    torch.set_num_threads(1)
    if args.size:
        seeds, layers = (int(n) for n in args.size.split("x"))
        print(json.dumps(measure(seeds, layers, args.epochs, args.steps)))
        return
    print(
        "| seeds x layers | gradient tensors | observe_step µs (median) | × floor "
        "| mean × floor's (flushes included) | flushing step × median "
        "| slowest × median: observe_step, floor | end_epoch ms: median, mean (of which GC) "
        "| step path held (MiB, RSS) "
        "| points per collection |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    grid: tuple[tuple[int, ...], ...] = QUICK_GRID if args.quick else GRID
    if args.sizes:
        grid = tuple(tuple(int(n) for n in size.split("x")) for size in args.sizes.split(","))
    for seeds, layers in grid:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks.scale",
                "--size",
                f"{seeds}x{layers}",
                "--epochs",
                str(args.epochs),
                "--steps",
                str(args.steps),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(out.stdout.splitlines()[-1])
        print(
            f"| {seeds} x {layers} | {r['tensors']} | {r['observe'] * 1e6:.0f} | {r['observe'] / r['floor']:.2f} "
            f"| {r['mean']:.2f} | {r['flush']:.1f} | {r['slowest']:.1f}, {r['floor_slowest']:.1f} "
            f"| {r['end_epoch'] * 1e3:.1f}, {r['end_epoch_mean'] * 1e3:.1f} "
            f"({r['end_epoch_gc'] * 1e3:.1f}) "
            f"| {r['held'] / 2**20:.1f} "
            f"| {r['points']} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
