"""Memory over a long run with seed churn: bounded by what is exported now, not by epochs or seed ids.

Run: ``python -m benchmarks.soak`` (10,000 epochs; ``--epochs`` to change). One process, one trainer
on an SDK ``MeterProvider`` with an ``InMemoryMetricReader`` collected after every epoch, as a periodic
exporter would. Every epoch a stage moves and the top-K rotates; every ``--churn`` epochs a seed is
culled and a new id germinates (a new module, so the step path's layout changes too). Prints, at
checkpoints: the SDK's attribute sets for the package's instruments, the Python heap (tracemalloc),
the RSS, the OpenTelemetry warnings so far and the points of the last collection against the budget.
``--quick`` (tests/test_benchmarks.py) runs 200 epochs and prints the heap kept (cycles collected) after
the first and the second 100 against what one seed's module holds.
"""

from __future__ import annotations

import argparse
import gc
import logging
import random
import resource
import sys
import tracemalloc
from collections.abc import Iterator, Mapping, Sequence

import torch
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import DataPointT, InMemoryMetricReader
from opentelemetry.util.types import AnyValue

from tolaria_otel import SeedLayerSettings, SeedLayerTelemetry, seed_layer_views
from tolaria_otel.export.instruments import SEED_STEP_NORM

STAGES = ["SEED_STAGE_GERMINATED", "SEED_STAGE_TRAINING", "SEED_STAGE_BLENDING", "SEED_STAGE_FOSSILIZED"]


class _Count(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


def sdk_attribute_sets(telemetry: SeedLayerTelemetry) -> int:
    """The SDK's aggregations for the package's instruments (its internals, on purpose: that is what grew)."""
    instruments = telemetry._instruments
    assert instruments is not None, "the soak's trainer is enabled and has a meter provider"
    total = 0
    for gauge in instruments.streams:
        for storage in gauge._measurement_consumer._reader_storages.values():
            total += sum(
                len(m._attributes_aggregation) for m in storage._instrument_view_instrument_matches.get(gauge, ())
            )
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10_000)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--layers", type=int, default=12, help="layers per seed")
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--churn", type=int, default=10, help="a seed is replaced every N epochs")
    parser.add_argument(
        "--quick", action="store_true", help="200 epochs, and the heap kept after the first and the second 100"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs = 200
    torch.set_num_threads(1)
    warnings = _Count()
    logging.getLogger("opentelemetry").addHandler(warnings)
    rng = random.Random(0)
    settings = SeedLayerSettings(enabled=True, top_k=args.top_k)
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], views=seed_layer_views(settings))

    def new_seed() -> torch.nn.ModuleList:
        return torch.nn.ModuleList(torch.nn.Linear(1, 1, bias=False) for _ in range(args.layers))

    active = {f"seed-{i}": (new_seed(), STAGES[0]) for i in range(args.seeds)}
    next_id = args.seeds
    telemetry = SeedLayerTelemetry(torch.nn.Module(), lambda: dict(active), settings=settings, meter_provider=provider)
    tracemalloc.start()
    kept: dict[int, int] = {}
    if args.quick:
        before = kept_heap()
        spare = new_seed()
        seed_bytes = kept_heap() - before  # what a released seed's module holds, were it kept
        del spare
    checkpoints = {1, 10, 100, 1000} | {args.epochs * i // 10 for i in range(1, 11)}
    print("| epoch | SDK attribute sets | Python heap MiB | RSS MiB | seed ids seen | OTel warnings | points |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    latest: set[tuple[str, str]] = set()  # the histogram series of the latest snapshot, and of the one before
    previous: set[tuple[str, str]] = set()
    for epoch in range(1, args.epochs + 1):
        for module, _ in active.values():
            for layer in module:
                weight = layer.get_parameter("weight")  # typed, where layer.weight is Tensor | Module
                weight.grad = torch.full_like(weight, rng.random())
        telemetry.observe_step()
        summary = telemetry.end_epoch()
        assert summary is not None, "an enabled trainer summarises every epoch"
        data = reader.get_metrics_data()
        metrics = [m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics] if data else []
        points = sum(len(m.data.data_points) for m in metrics)
        gauges = sum(len(m.data.data_points) for m in metrics if m.name != SEED_STEP_NORM)
        # The gauges: exactly the latest snapshot (per seed its norm and largest step, per top-K layer its norm
        # and largest step; the settings info and the series budget).
        expected = sum(2 * len(s.top_layers) + 2 for s in summary.seeds.values()) + 2
        # The histogram is cumulative: the series of a seed's stage it left is still exported (its counts must
        # reach the collector) until the next change of the exported sets releases it.
        histograms = {
            (attributes["seed_id"], attributes["stage"])
            for m in metrics
            if m.name == SEED_STEP_NORM
            for attributes in point_attributes(m.data.data_points)
        }
        now = {(s.seed_id, s.stage) for s in summary.seeds.values()}
        if now != latest:
            previous, latest = latest, now
        if gauges != expected or not now <= histograms <= now | previous:
            print(
                f"epoch {epoch}: {gauges} gauge points exported, expected {expected}; histogram series "
                f"{sorted(histograms)}, expected {sorted(now)} and at most {sorted(previous - now)}",
                file=sys.stderr,
            )
            return 1
        moved = rng.choice(sorted(active))
        active[moved] = (active[moved][0], rng.choice(STAGES))
        if epoch % args.churn == 0:
            del active[rng.choice(sorted(active))]
            active[f"seed-{next_id}"] = (new_seed(), STAGES[0])
            next_id += 1
        if args.quick and epoch in (args.epochs // 2, args.epochs):
            kept[epoch] = kept_heap()
        if epoch in checkpoints:
            heap = tracemalloc.get_traced_memory()[0] / 2**20
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(
                f"| {epoch} | {sdk_attribute_sets(telemetry)} | {heap:.2f} | {rss:.0f} | {next_id} | "
                f"{warnings.count} | {points} |",
                flush=True,
            )
    if args.quick:
        # A short run cannot show 10,000 epochs flat; it can show that the second half, after the first-use
        # caches filled (within about 60 epochs), keeps less than one released seed would, while
        # epochs / 2 / churn seeds were released in it.
        half, end = kept
        print(
            f"heap kept after epoch {half}: {kept[half]} B, after epoch {end}: {kept[end]} B, growth "
            f"{kept[end] - kept[half]} B; one seed module: {seed_bytes} B; seeds released meanwhile: "
            f"{(end - half) // args.churn}"
        )
    return 0


def point_attributes(points: Sequence[DataPointT]) -> Iterator[Mapping[str, AnyValue]]:
    """Each point's attribute set: the SDK gives every point of a collection one (``None`` only in its type)."""
    for point in points:
        assert point.attributes is not None, f"a collected point without attributes: {point}"
        yield point.attributes


def kept_heap() -> int:
    """The Python heap that is kept: the garbage of reference cycles freed first."""
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


if __name__ == "__main__":
    sys.exit(main())
