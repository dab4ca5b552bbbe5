"""The meter, the instruments and the views of the metric family ``tolaria.grad_agg.seed.*``.

All instruments are observable gauges that report the latest epoch's snapshot at each collection.
An observable gauge exports exactly the attribute sets its callback observed in that collection, so
a layer that left the top-K stops being exported at once. (A synchronous gauge, under the default
cumulative temporality, would keep exporting every attribute set it was ever given.)

The SDK keeps every attribute set an asynchronous instrument has ever observed, and its cardinality
limit counts them over the life of the metric stream. A long run with a rotating top-K, seeds
coming and going and stage changes would reach it and fold new points into the
``otel.metric.overflow`` set. :class:`SeedLayerInstruments` counts the attribute sets each stream
has seen and, before a snapshot would pass the limit, moves to a fresh set of streams: a meter of
the same name whose scope carries the attribute ``tolaria.otel.stream`` (the generation). The
metric names, units and point attributes do not change.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence

from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation
from opentelemetry.sdk.metrics.view import DropAggregation, View

from ._version import __version__
from .settings import SeedLayerSettings
from .summary import EpochSummary

LAYER_NORM = "tolaria.grad_agg.seed.layer_norm"
LAYER_NONFINITE = "tolaria.grad_agg.seed.layer_nonfinite"
SEED_NORM = "tolaria.grad_agg.seed.norm"
SETTINGS_INFO = "tolaria.grad_agg.seed_layer.info"
SERIES_BUDGET = "tolaria.grad_agg.seed_layer.series_budget"
UNIT = "grad"
METER_NAME = "tolaria_otel"
STREAM_SCOPE_ATTRIBUTE = "tolaria.otel.stream"

LAYER_ATTRIBUTES = frozenset({"seed_id", "stage", "layer"})
SEED_ATTRIBUTES = frozenset({"seed_id", "stage"})
SETTINGS_ATTRIBUTES = frozenset({"enabled", "top_k", "compact", "sample_every"})

#: Distinct attribute sets a stream may see in its life (the SDK's default limit, made explicit
#: by the views so that rotation and the SDK agree on it).
STREAM_CARDINALITY_LIMIT = 2000

_logger = logging.getLogger(__name__)
_LAYER_INSTRUMENTS = (LAYER_NORM, LAYER_NONFINITE)


def seed_layer_views(settings: SeedLayerSettings | None = None) -> list[View]:
    """Views for an application that builds its own ``MeterProvider``.

    They keep exactly the contract's attributes on each instrument, make the cardinality limit
    explicit, and in compact mode drop the per-layer instruments altogether.
    """
    settings = SeedLayerSettings.from_env() if settings is None else settings
    views = [
        View(
            instrument_name=SEED_NORM,
            attribute_keys=set(SEED_ATTRIBUTES),
            aggregation_cardinality_limit=STREAM_CARDINALITY_LIMIT,
        ),
        View(instrument_name=SETTINGS_INFO, attribute_keys=set(SETTINGS_ATTRIBUTES)),
        View(instrument_name=SERIES_BUDGET, attribute_keys=set()),
    ]
    for name in _LAYER_INSTRUMENTS:
        if settings.compact:
            views.append(View(instrument_name=name, aggregation=DropAggregation()))
        else:
            views.append(
                View(
                    instrument_name=name,
                    attribute_keys=set(LAYER_ATTRIBUTES),
                    aggregation_cardinality_limit=STREAM_CARDINALITY_LIMIT,
                )
            )
    return views


def snapshot_points(summary: EpochSummary, emit_layers: bool) -> dict[str, list[Observation]]:
    """The points an epoch summary exports, per instrument.

    Non-finite values go to ``layer_nonfinite`` (value 1) because the SDK drops, with a warning,
    any non-finite measurement; a non-finite seed total is left out for the same reason.
    """
    points: dict[str, list[Observation]] = {LAYER_NORM: [], LAYER_NONFINITE: [], SEED_NORM: []}
    for seed in summary.seeds.values():
        seed_attributes = {"seed_id": seed.seed_id, "stage": seed.stage}
        if math.isfinite(seed.total_norm):
            points[SEED_NORM].append(Observation(seed.total_norm, seed_attributes))
        if not emit_layers:
            continue
        for layer, value in seed.top_layers:
            attributes = {**seed_attributes, "layer": layer}
            if math.isfinite(value):
                points[LAYER_NORM].append(Observation(value, attributes))
            else:
                points[LAYER_NONFINITE].append(Observation(1, attributes))
    return points


class _Streams:
    """One generation of instruments, reading the snapshot it was last given."""

    def __init__(self, meter_provider: MeterProvider, generation: int, emit_layers: bool) -> None:
        scope = None if generation == 0 else {STREAM_SCOPE_ATTRIBUTE: generation}
        meter = meter_provider.get_meter(METER_NAME, __version__, attributes=scope)
        self.points: dict[str, list[Observation]] = {}
        meter.create_observable_gauge(
            SEED_NORM,
            [self._reader(SEED_NORM)],
            unit=UNIT,
            description="Per seed, RMS over the epoch's sampled optimizer steps of the L2 norm of all its gradients.",
        )
        if emit_layers:
            meter.create_observable_gauge(
                LAYER_NORM,
                [self._reader(LAYER_NORM)],
                unit=UNIT,
                description="Top-K layers per seed: RMS over the epoch's sampled optimizer steps of the "
                "L2 norm of the layer's direct parameters' gradients.",
            )
            meter.create_observable_gauge(
                LAYER_NONFINITE,
                [self._reader(LAYER_NONFINITE)],
                unit="",  # unit-less: "1" would add a _ratio suffix in Prometheus
                description="1 for a top-K layer whose epoch gradient norm is NaN or Inf.",
            )

    def _reader(self, name: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            return self.points.get(name, ())

        return observe


class SeedLayerInstruments:
    """Publishes epoch summaries to observable gauges, keeping every stream under its limit."""

    def __init__(self, meter_provider: MeterProvider, settings: SeedLayerSettings) -> None:
        self._provider = meter_provider
        self._emit_layers = settings.emits_layers
        self.generation = 0
        self._streams = _Streams(meter_provider, 0, self._emit_layers)
        self._seen: dict[str, set[tuple[tuple[str, str], ...]]] = {}
        # The signal alert rules need to tell "feature on, nothing measured" from "feature off".
        self._settings_info = [Observation(1, {
            "enabled": "true",
            "top_k": str(settings.top_k),
            "compact": str(settings.compact).lower(),
            "sample_every": str(settings.sample_every),
        })]
        self._top_k = settings.top_k
        self._budget: list[Observation] = []
        meter = meter_provider.get_meter(METER_NAME, __version__)
        meter.create_observable_gauge(
            SETTINGS_INFO,
            [lambda options: self._settings_info],
            unit="",  # unit-less: "1" would add a _ratio suffix in Prometheus
            description="1 while the per-layer seed summaries are on; attributes give the effective settings.",
        )
        meter.create_observable_gauge(
            SERIES_BUDGET,
            [lambda options: self._budget],
            unit="",
            description="Per-layer series this trainer may export now: top_k x active seeds (0 in compact mode).",
        )

    def publish(self, summary: EpochSummary) -> None:
        """Make ``summary`` the snapshot every later collection exports."""
        points = {name: _cap(name, obs) for name, obs in snapshot_points(summary, self._emit_layers).items()}
        keys = {name: {_key(point) for point in obs} for name, obs in points.items()}
        if any(len(self._seen.get(name, set()) | new) > STREAM_CARDINALITY_LIMIT for name, new in keys.items()):
            self._streams.points = {}
            self.generation += 1
            self._streams = _Streams(self._provider, self.generation, self._emit_layers)
            self._seen = {}
            _logger.info("tolaria_otel: metric streams renewed (generation %d) to stay under the cardinality limit",
                         self.generation)
        for name, new in keys.items():
            self._seen.setdefault(name, set()).update(new)
        self._streams.points = points
        self._budget = [Observation(self._top_k * len(summary.seeds) if self._emit_layers else 0)]

    def clear(self) -> None:
        """Export the latest snapshot once more (a push exporter would otherwise never send the last
        epoch if the provider is shut down after this), then export nothing from now on."""
        force_flush = getattr(self._provider, "force_flush", None)  # the SDK's provider, not the API's
        if force_flush is not None:
            force_flush()
        self._streams.points = {}
        self._settings_info = []
        self._budget = []


def _key(point: Observation) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, str(v)) for k, v in (point.attributes or {}).items()))


def _cap(name: str, points: Sequence[Observation]) -> list[Observation]:
    if len(points) <= STREAM_CARDINALITY_LIMIT:
        return list(points)
    _logger.warning("tolaria_otel: %d points for %s exceed the stream limit %d; keeping the first %d "
                    "(lower TOLARIA_SEED_LAYER_TOPK)", len(points), name, STREAM_CARDINALITY_LIMIT,
                    STREAM_CARDINALITY_LIMIT)
    return list(points[:STREAM_CARDINALITY_LIMIT])


