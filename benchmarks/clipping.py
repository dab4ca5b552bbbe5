"""The measure-and-clip call against the clip alone, on workloads (a) and (b) (benchmarks/overhead.py).

    python -m benchmarks.clipping                 # (a) and (b) with 100 seed layers, a few minutes
    python -m benchmarks.clipping --quick         # tiny sizes, for the smoke test

Every variant clips the whole model's gradients to 1.0 at every step, as a clipped run does. The
base is torch's ``clip_grad_norm_`` alone (no telemetry); the ratios are epoch times against it,
measured side by side in one process (overhead.measure: interleaved rounds, medians).

* ``telemetry.clip_grad_norm_``: the package's measure-and-clip call, attached to the optimizer;
  the clip's per-tensor norms are the step's values (goal: within 1.05x of the clip alone);
* ``attach + torch clip``: the same through ``torch.nn.utils.clip_grad_norm_`` while attached;
* ``observe_step + torch clip``: measuring apart, before torch's clip (one more foreach norm per step),
  what a clipped loop costs without the shared norms.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence

import torch
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from benchmarks.overhead import Run, Telemetry, Variant, Workload, deep_workload, measure, seeded_mlp_workload
from tolaria_otel import SeedLayerTelemetry, seed_layer_views
from tolaria_otel.demo.seeded_mlp import SeedRegistry

CLIP = 1.0


class ClipAlone(Variant):
    name = "torch clip_grad_norm_ alone"

    def setup(self, run: Run) -> None:
        self.params = list(run.model.parameters())

    def step(self, last: bool) -> None:
        torch.nn.utils.clip_grad.clip_grad_norm_(self.params, CLIP)


class MeasuredClip(Telemetry):
    """The telemetry attached to the optimizer; ``how`` is how the step clips."""

    def __init__(self, name: str, how: str) -> None:
        super().__init__(name)
        self.how = how

    def setup(self, run: Run) -> None:
        super().setup(run)
        self.params = list(run.model.parameters())

    def step(self, last: bool) -> None:
        if self.how == "shared":
            self.telemetry.clip_grad_norm_(self.params, CLIP)
        elif self.how == "patched":
            torch.nn.utils.clip_grad_norm_(self.params, CLIP)
        else:  # apart: measure now (the post-hook would see clipped gradients), then torch's own clip
            self.telemetry.observe_step()
            torch.nn.utils.clip_grad.clip_grad_norm_(self.params, CLIP)


class MeasuredApart(MeasuredClip):
    """Not attached: ``observe_step()`` by hand, before torch's clip (attached, it would also count the step)."""

    def setup(self, run: Run) -> None:
        self.reader = InMemoryMetricReader()
        self.provider = MeterProvider(metric_readers=[self.reader], views=seed_layer_views(self.settings))
        registry = SeedRegistry()
        for seed_id, module in run.seeds.items():
            registry.add(seed_id, module, "TRAINING")
        self.telemetry = SeedLayerTelemetry(run.model, registry, settings=self.settings, meter_provider=self.provider)
        self.params = list(run.model.parameters())


def variants() -> list[Variant]:
    return [
        ClipAlone(),
        MeasuredClip("telemetry.clip_grad_norm_", "shared"),
        MeasuredClip("attach + torch clip", "patched"),
        MeasuredApart("observe_step + torch clip", "apart"),
    ]


def report(workload: Workload, rounds: int, epochs: int) -> str:
    results = measure(workload, variants(), rounds=rounds, warmup=2, epochs=epochs)
    lines = [
        f"{workload.name}: {workload.description}; {rounds} rounds x {epochs} epochs",
        "| variant | epoch time / clip alone (paired median) | CPU time / clip alone | ms per epoch (median) "
        "| host reads per step | ATen ops per step |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    base_cpu = statistics.median(results[0].cpu)
    lines.extend(
        f"| {result.variant.name} | {statistics.median(result.paired):.3f} | "
        f"{statistics.median(result.cpu) / base_cpu:.3f} | "
        f"{1000 * statistics.median(result.times):.1f} | {result.reads_per_step:g} | "
        f"{result.ops_per_step:g} |"
        for result in results
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.clipping", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--depth", type=int, default=25, help="(b): Linear layers per seed (4 seeds)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the smoke test")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # steadier on a shared 2-core machine, as benchmarks.overhead
    samples = 64 if args.quick else 512
    rounds = 1 if args.quick else args.rounds
    for workload in (seeded_mlp_workload(samples=samples), deep_workload(args.depth, samples=samples)):
        print(report(workload, rounds, 1 if args.quick else args.epochs), flush=True)
        print()


if __name__ == "__main__":
    main()
