"""Shared test helpers: a real training loop, an independent reference, and metric readers."""

from __future__ import annotations

import inspect
import logging
import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import pytest
import torch
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader, NumberDataPoint
from opentelemetry.sdk.metrics.view import View
from torch import nn

from tolaria_otel import SeedLayerSettings, SeedLayerTelemetry, seed_layer_views
from tolaria_otel.demo.seeded_mlp import SeededMLP, SeedRegistry

#: Whether this SDK's views take a cardinality limit (1.45.2 on): an older one caps no stream.
VIEWS_TAKE_CARDINALITY_LIMIT = "aggregation_cardinality_limit" in inspect.signature(View).parameters


def besides_the_start_note(records: Iterable[logging.LogRecord]) -> list[logging.LogRecord]:
    """``records`` without the note the first views of a process give on an SDK that caps no stream."""
    return [record for record in records if "views take no cardinality limit" not in record.getMessage()]


def metered(settings: SeedLayerSettings) -> tuple[MeterProvider, InMemoryMetricReader]:
    reader = InMemoryMetricReader()
    return MeterProvider(metric_readers=[reader], views=seed_layer_views(settings)), reader


def provider_readers(provider: MeterProvider) -> list[Any]:
    """The metric readers of an SDK provider (private state: SDK 1.43 moved them out of its configuration)."""
    readers = getattr(provider, "_metric_readers", None)
    return list(provider._sdk_config.metric_readers if readers is None else readers)  # type: ignore[attr-defined]


def collect(reader: InMemoryMetricReader) -> dict[str, list[tuple[dict, Any, str | None]]]:
    """One collection: metric name -> [(attributes, value, unit)]; a histogram's value is its
    ``HistogramDataPoint``. The value is ``Any`` because a metric's name tells which kind it is: callers read a
    gauge's number or a histogram's fields without narrowing each point."""
    out: dict[str, list[tuple[dict, Any, str | None]]] = defaultdict(list)
    data = reader.get_metrics_data()
    if data is None:
        return out
    for resource_metrics in data.resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                for point in metric.data.data_points:
                    if isinstance(point, HistogramDataPoint):
                        out[metric.name].append((dict(point.attributes or {}), point, metric.unit))
                        continue
                    assert isinstance(point, NumberDataPoint)
                    out[metric.name].append((dict(point.attributes or {}), point.value, metric.unit))
    return out


def seeded_network(seed_count: int, *, seed: int = 0) -> tuple[SeededMLP, SeedRegistry]:
    torch.manual_seed(seed)
    model = SeededMLP()
    registry = SeedRegistry()
    for i in range(seed_count):
        registry.add(f"seed-{i}", model.graft(f"seed_{i}"), "TRAINING")
    return model, registry


class ReferenceNorms:
    """The contract of docs/contracts.md computed the plain way, in float64, from a pre-step hook.

    Registered on the optimizer before the telemetry, it sees exactly the gradients it sees.
    """

    def __init__(self, registry: SeedRegistry) -> None:
        self.registry = registry
        self.squares: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.totals: dict[str, float] = defaultdict(float)
        self.steps = 0

    def hook(self, optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        self.steps += 1
        for seed_id, module in self.registry.modules.items():
            seen: dict[int, torch.Tensor] = {}
            for name, sub in module.named_modules():
                grads = [p.grad for p in sub.parameters(recurse=False) if p.requires_grad]
                if not grads:
                    continue
                self.squares[seed_id][name or "(root)"] += sum(
                    float(g.double().pow(2).sum()) for g in grads if g is not None
                )
                for p in sub.parameters(recurse=False):
                    if p.grad is not None and p.requires_grad:
                        seen[id(p)] = p.grad
            self.totals[seed_id] += sum(float(g.double().pow(2).sum()) for g in seen.values())

    def epoch(self) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
        """(seed -> layer -> RMS, seed -> total RMS) for the epoch so far, then reset."""
        layers = {s: {layer: math.sqrt(v / self.steps) for layer, v in d.items()} for s, d in self.squares.items()}
        totals = {s: math.sqrt(v / self.steps) for s, v in self.totals.items()}
        self.squares.clear()
        self.totals.clear()
        self.steps = 0
        return layers, totals


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    steps: int,
    batch: int = 32,
    accumulate: int = 1,
    generator: torch.Generator,
    before_step: Callable[[], None] | None = None,
) -> None:
    """``steps`` optimizer steps of regression to random targets, ``accumulate`` micro-batches each."""
    for _ in range(steps):
        for _ in range(accumulate):
            x = torch.randn(batch, 32, generator=generator)
            y = torch.randn(batch, 10, generator=generator)
            loss = nn.functional.mse_loss(model(x), y) / accumulate
            loss.backward()
        if before_step is not None:
            before_step()
        optimizer.step()
        optimizer.zero_grad()


def expected_top_k(values: dict[str, float], k: int) -> list[tuple[str, float]]:
    """Independent top-K: sort all by (non-finite first, value descending, name ascending)."""

    def key(item: tuple[str, float]) -> tuple[int, float, str]:
        return (1, -item[1], item[0]) if math.isfinite(item[1]) else (0, 0.0, item[0])

    return sorted(values.items(), key=key)[:k]


def telemetry_for(
    model: nn.Module, seeds: object, settings: SeedLayerSettings
) -> tuple[SeedLayerTelemetry, InMemoryMetricReader]:
    provider, reader = metered(settings)
    return SeedLayerTelemetry(model, seeds, settings=settings, meter_provider=provider), reader  # type: ignore[arg-type]


def layer_points(points: Iterable[tuple[dict, Any, str | None]]) -> dict[tuple[str, str], float]:
    return {(attrs["seed_id"], attrs["layer"]): value for attrs, value, _ in points}


def sdk_attribute_sets(telemetry: SeedLayerTelemetry, per_stream: bool = False):
    """How many attribute sets the SDK holds for the telemetry's instruments, over all readers (or,
    ``per_stream``, the list of each stream's count).

    Reads SDK internals on purpose: that state is what grows without bound when it is not released.
    """
    counts: list[int] = []
    for instrument in telemetry._instruments.streams:
        for storage in instrument._measurement_consumer._reader_storages.values():
            counts.extend(
                len(match._attributes_aggregation)
                for match in storage._instrument_view_instrument_matches.get(instrument, ())
            )
    return counts if per_stream else sum(counts)


def export_each_flush(env: pytest.MonkeyPatch, metrics_url: str, service: str, top_k: int) -> None:
    """The feature on at ``top_k``, exporting OTLP/HTTP straight to ``metrics_url`` as ``service`` only when the
    provider is flushed (once per epoch end in these tests)."""
    env.setenv("OTEL_METRICS_EXPORTER", "otlp")
    env.setenv("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", metrics_url)
    env.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    env.setenv("OTEL_METRIC_EXPORT_INTERVAL", "600000")
    env.setenv("OTEL_SERVICE_NAME", service)
    env.setenv("TOLARIA_SEED_LAYER_SUMMARIES_ENABLED", "true")
    env.setenv("TOLARIA_SEED_LAYER_TOPK", str(top_k))
