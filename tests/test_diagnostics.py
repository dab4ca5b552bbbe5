"""Beyond the epoch RMS: per-step spikes, the per-step distribution, the seed-to-host ratio, every layer
and a health state in process; exact against an independent float64 reference."""

from __future__ import annotations

import bisect
import math
from collections import defaultdict

import pytest
import torch
from torch import nn

from tolaria_otel import LAYER_NORM, SeedLayerSettings
from tolaria_otel.config.histogram import HISTOGRAM_BOUNDARIES
from tolaria_otel.demo.seeded_mlp import SeededMLP, SeedRegistry
from tolaria_otel.export.instruments import HOST_NORM, LAYER_NORM_MAX, SEED_HOST_RATIO, SEED_NORM_MAX, SEED_STEP_NORM
from tolaria_otel.measure.step_norms import FLUSH_EVERY
from tolaria_otel.summary.health import EXPLODING_ABOVE, VANISHING_BELOW

from .helpers import collect, telemetry_for

ON = SeedLayerSettings(enabled=True, top_k=2)


class StepReference:
    """Per seed, per layer and for the host: every step's norm, in float64, from the gradients as they are."""

    def __init__(self, model: nn.Module, registry: SeedRegistry) -> None:
        self.model, self.registry = model, registry
        self.layers: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        self.totals: dict[str, list[float]] = defaultdict(list)
        self.numel: dict[str, int] = {}
        self.host: list[float] = []
        self.host_numel = 0

    def step(self) -> None:
        in_seeds = set()
        for seed_id, module in self.registry.modules.items():
            params: dict[int, nn.Parameter] = {}
            for name, sub in module.named_modules():
                own = [p for p in sub.parameters(recurse=False) if p.requires_grad]
                if own:
                    self.layers[seed_id][name or "(root)"].append(
                        math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in own if p.grad is not None))
                    )
                params.update((id(p), p) for p in own)
            in_seeds |= set(params)
            with_grad = [p for p in params.values() if p.grad is not None]
            self.totals[seed_id].append(math.sqrt(sum((float(p.grad.double().pow(2).sum()) for p in with_grad), 0.0)))
            self.numel[seed_id] = sum(p.numel() for p in with_grad)
        host = [p for p in self.model.parameters() if p.requires_grad and id(p) not in in_seeds and p.grad is not None]
        self.host.append(math.sqrt(sum((float(p.grad.double().pow(2).sum()) for p in host), 0.0)))
        self.host_numel = sum(p.numel() for p in host)


def rms(values: list[float]) -> float:
    return math.sqrt(sum(v * v for v in values) / len(values))


def counts(values: list[float], boundaries: tuple[float, ...] = HISTOGRAM_BOUNDARIES) -> tuple[int, ...]:
    """OpenTelemetry's explicit buckets: (b[i-1], b[i]], the last one above every bound."""
    out = [0] * (len(boundaries) + 1)
    for value in values:
        out[bisect.bisect_left(boundaries, value)] += 1
    return tuple(out)


def train(steps: int, settings: SeedLayerSettings, spike_at: int | None = None):
    torch.manual_seed(0)
    model, registry = SeededMLP(), SeedRegistry()
    for i in range(2):
        registry.add(f"seed-{i}", model.graft(f"seed_{i}"), "SEED_STAGE_TRAINING")
    telemetry, reader = telemetry_for(model, registry, settings)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    reference = StepReference(model, registry)
    generator = torch.Generator().manual_seed(1)
    for step in range(steps):
        x = torch.randn(16, 32, generator=generator)
        nn.functional.mse_loss(model(x), torch.randn(16, 10, generator=generator)).backward()
        if step == spike_at:  # one step whose gradient is 300 times the others
            for p in registry.modules["seed-1"].parameters():
                p.grad.mul_(300.0)
        reference.step()
        telemetry.observe_step()
        optimizer.step()
        optimizer.zero_grad()
    return telemetry.end_epoch(), reference, collect(reader)


#: The exported buckets per TOLARIA_SEED_STEP_NORM_HISTOGRAM, written out here: one per decade, four per decade.
EXPORTED_BOUNDS = {"coarse": tuple(10.0**k for k in range(-8, 5)), "fine": HISTOGRAM_BOUNDARIES}


@pytest.mark.parametrize(
    ("steps", "resolution"), [(5, "coarse"), (FLUSH_EVERY + 7, "coarse"), (5, "fine"), (FLUSH_EVERY + 7, "fine")]
)  # inside one batch of steps, and across two
def test_spikes_distribution_and_every_layer_are_exact(steps, resolution):
    summary, reference, exported = train(steps, ON.replace(step_norm_histogram=resolution), spike_at=3)
    for seed_id, seed in summary.seeds.items():
        totals = reference.totals[seed_id]
        assert seed.total_norm == pytest.approx(rms(totals), rel=1e-5)
        assert seed.max_norm == pytest.approx(max(totals), rel=1e-5)
        assert seed.layer_norms == pytest.approx({k: rms(v) for k, v in reference.layers[seed_id].items()}, rel=1e-5)
        assert seed.layer_max == pytest.approx({k: max(v) for k, v in reference.layers[seed_id].items()}, rel=1e-5)
        assert seed.step_norm_counts == counts(totals) and sum(seed.step_norm_counts) == steps
        assert seed.nonfinite_steps == 0
    spiked = summary.seeds["seed-1"]
    assert spiked.max_norm > 10 * summary.seeds["seed-0"].max_norm  # the spike the RMS spreads over the epoch
    maxima = {(a["seed_id"], a["layer"]): v for a, v, _ in exported[LAYER_NORM_MAX]}
    assert set(maxima) == {(a["seed_id"], a["layer"]) for a, _, _ in exported[LAYER_NORM]}  # the same top-K
    for (seed_id, layer), value in maxima.items():
        assert value == pytest.approx(max(reference.layers[seed_id][layer]), rel=1e-5)
    assert {a["seed_id"]: v for a, v, _ in exported[SEED_NORM_MAX]} == pytest.approx(
        {s: max(reference.totals[s]) for s in summary.seeds}, rel=1e-5
    )
    histograms = {a["seed_id"]: point for a, point, _ in exported[SEED_STEP_NORM]}
    for seed_id, point in histograms.items():
        bounds = EXPORTED_BOUNDS[resolution]
        assert tuple(point.explicit_bounds) == pytest.approx(bounds, rel=1e-12)
        assert tuple(point.bucket_counts) == counts(reference.totals[seed_id], bounds) and point.count == steps


def test_host_norm_and_ratio_when_switched_on():
    summary, reference, exported = train(6, ON.replace(host_norm=True))
    host = rms(reference.host)
    assert summary.host_norm == pytest.approx(host, rel=1e-5)
    for seed_id, seed in summary.seeds.items():
        want = (rms(reference.totals[seed_id]) / host) * math.sqrt(reference.host_numel / reference.numel[seed_id])
        assert seed.host_ratio == pytest.approx(want, rel=1e-5)
    assert [v for _, v, _ in exported[HOST_NORM]] == pytest.approx([host], rel=1e-5)
    assert {a["seed_id"] for a, _, _ in exported[SEED_HOST_RATIO]} == set(summary.seeds)
    off, _, exported_off = train(6, ON)
    assert off.host_norm is None and all(s.host_ratio is None for s in off.seeds.values())
    assert HOST_NORM not in exported_off and SEED_HOST_RATIO not in exported_off


def test_health_states_with_their_thresholds():
    seeds = nn.ModuleDict(
        {name: nn.Linear(2, 2, bias=False) for name in ("absent", "nan", "exploding", "spiky", "vanishing", "healthy")}
    )
    source = {name: (module, "SEED_STAGE_TRAINING") for name, module in seeds.items()}
    telemetry, _ = telemetry_for(seeds, source, ON)
    fills = {
        "nan": [1.0, math.nan, 1.0],
        "exploding": [EXPLODING_ABOVE] * 3,
        "spiky": [1e-3] * 199 + [1.0],
        "vanishing": [VANISHING_BELOW / 10] * 3,
        "healthy": [0.5, 0.6, 0.4],
    }
    for step in range(200):
        for name, module in seeds.items():
            values = fills.get(name)
            module.weight.grad = (
                None
                if values is None
                else torch.full((2, 2), values[step % len(values)] if name != "spiky" else values[step])
            )
        telemetry.observe_step()
    summary = telemetry.end_epoch()
    assert {s: v.health for s, v in summary.seeds.items()} == {
        "absent": "not_measured",
        "nan": "nonfinite",
        "exploding": "exploding",
        "spiky": "exploding",
        "vanishing": "vanishing",
        "healthy": "healthy",
    }
    assert summary.seeds["nan"].nonfinite_steps == 67  # steps 1, 4, 7, ... of 200
    assert summary.to_dict()["seeds"][0]["health"] == "not_measured"


@pytest.mark.parametrize("fast", [True, False])
def test_recording_counts_equals_recording_each_value_in_every_reader(monkeypatch, fast):
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from tolaria_otel.export import sdk_state

    if not fast:  # an SDK whose internals are not the known ones: one record() per value
        monkeypatch.setattr(sdk_state, "_add_to_buckets", lambda *args: False)
    counts = [(1e-3, 5), (0.1, 1), (10.0, 300), (HISTOGRAM_BOUNDARIES[-1] * 2, 2)]

    def points(record) -> list[tuple]:
        readers = [InMemoryMetricReader(), InMemoryMetricReader()]
        histogram = (
            MeterProvider(metric_readers=readers)
            .get_meter("t")
            .create_histogram("h", explicit_bucket_boundaries_advisory=HISTOGRAM_BOUNDARIES)
        )
        out = []
        for _ in range(2):  # new attributes, then an aggregation that exists (the next epoch)
            record(histogram)
            for reader in readers:
                (point,) = reader.get_metrics_data().resource_metrics[0].scope_metrics[0].metrics[0].data.data_points
                out.append((point.count, point.sum, tuple(point.bucket_counts), point.min, point.max))
        return out

    def one_by_one(histogram) -> None:
        for value, count in counts:
            for _ in range(count):
                histogram.record(value, {"seed_id": "s"})

    got = points(lambda h: sdk_state.record_counts(h, [({"seed_id": "s"}, counts)]))
    want = points(one_by_one)
    for (count, total, buckets, low, high), (want_count, want_total, want_buckets, want_low, want_high) in zip(
        got, want
    ):
        assert (count, buckets, low, high) == (want_count, want_buckets, want_low, want_high)
        assert total == pytest.approx(want_total)
