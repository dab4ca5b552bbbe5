"""The meter, the instruments and the views of the metric family ``tolaria.grad_agg.seed.*``.

All instruments are observable gauges that report the latest epoch's snapshot at each collection.
An observable gauge exports exactly the attribute sets its callback observed in that collection, so
a layer that left the top-K stops being exported at once. (A synchronous gauge, under the default
cumulative temporality, would keep exporting every attribute set it was ever given.)

Each trainer has its own meter: several trainers may share one ``MeterProvider`` (Esper runs
several environments per process), each with its own streams, its own cardinality limit, and its
identity attributes (for example ``env_id``) on every point so their series stay apart in any
backend. The scope attribute ``tolaria.otel.trainer`` (the identity as ``key=value,...``) is what
makes the meters distinct inside the SDK.

The SDK keeps every attribute set an asynchronous instrument has ever observed, and its cardinality
limit counts them over the life of the stream; a long run with seeds coming and going would pass it
and grow without bound. ``sdk_state.release_idle_attribute_sets`` drops, at each epoch end, the
state of the attribute sets that are in neither the current nor the previous snapshot.
"""

from __future__ import annotations

import logging
import math
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from opentelemetry.metrics import CallbackOptions, MeterProvider, ObservableGauge, Observation
from opentelemetry.sdk.metrics.view import DropAggregation, View

from ._version import __version__
from .sdk_state import release_idle_attribute_sets
from .settings import SeedLayerSettings
from .summary import EpochSummary

LAYER_NORM = "tolaria.grad_agg.seed.layer_norm"
LAYER_NONFINITE = "tolaria.grad_agg.seed.layer_nonfinite"
SEED_NORM = "tolaria.grad_agg.seed.norm"
SEED_NOT_MEASURED = "tolaria.grad_agg.seed.not_measured"
SETTINGS_INFO = "tolaria.grad_agg.seed_layer.info"
SERIES_BUDGET = "tolaria.grad_agg.seed_layer.series_budget"
UNIT = "grad"
METER_NAME = "tolaria_otel"
TRAINER_SCOPE_ATTRIBUTE = "tolaria.otel.trainer"

LAYER_ATTRIBUTES = frozenset({"seed_id", "stage", "layer"})
SEED_ATTRIBUTES = frozenset({"seed_id", "stage"})
SETTINGS_ATTRIBUTES = frozenset({"enabled", "top_k", "compact", "sample_every"})
#: Attribute keys a trainer identity may not use: they are the points' own.
RESERVED_ATTRIBUTES = LAYER_ATTRIBUTES | SETTINGS_ATTRIBUTES

#: Distinct attribute sets a stream may hold (the SDK's default limit, made explicit by the views).
STREAM_CARDINALITY_LIMIT = 2000

_logger = logging.getLogger(__name__)
_LAYER_INSTRUMENTS = (LAYER_NORM, LAYER_NONFINITE)
_PointKey = tuple[tuple[str, str], ...]


def seed_layer_views(settings: SeedLayerSettings | None = None) -> list[View]:
    """Views for an application that builds its own ``MeterProvider``.

    They make the cardinality limit explicit and, in compact mode, drop the per-layer instruments.
    They keep every attribute the package gives (the contract's, plus a trainer's identity).
    """
    settings = SeedLayerSettings.from_env() if settings is None else settings
    views = [View(instrument_name=name, aggregation_cardinality_limit=STREAM_CARDINALITY_LIMIT)
             for name in (SEED_NORM, SEED_NOT_MEASURED, SETTINGS_INFO, SERIES_BUDGET)]
    for name in _LAYER_INSTRUMENTS:
        if settings.compact:
            views.append(View(instrument_name=name, aggregation=DropAggregation()))
        else:
            views.append(View(instrument_name=name, aggregation_cardinality_limit=STREAM_CARDINALITY_LIMIT))
    return views


def snapshot_points(summary: EpochSummary, emit_layers: bool,
                    identity: Mapping[str, str] | None = None) -> dict[str, list[Observation]]:
    """The points an epoch summary exports, per instrument.

    Non-finite values go to ``layer_nonfinite`` (value 1) because the SDK drops, with a warning,
    any non-finite measurement; a non-finite seed total is left out for the same reason. A seed
    that had no gradient in the epoch exports ``seed.not_measured`` = 1 and no norm at all.
    """
    identity = identity or {}
    points: dict[str, list[Observation]] = {LAYER_NORM: [], LAYER_NONFINITE: [], SEED_NORM: [],
                                            SEED_NOT_MEASURED: []}
    for seed in summary.seeds.values():
        seed_attributes = {**identity, "seed_id": seed.seed_id, "stage": seed.stage}
        if seed.total_norm is None:
            points[SEED_NOT_MEASURED].append(Observation(1, seed_attributes))
            continue
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


def trainer_scope(identity: Mapping[str, str]) -> str:
    """The identity as one scope attribute value: ``env_id=3,host=a`` (keys sorted)."""
    return ",".join(f"{key}={value}" for key, value in sorted(identity.items()))


#: Per meter provider, each trainer identity's instruments: created once, reused by a trainer that
#: takes over an identity after close() (the SDK would ignore a second instrument of the same name).
_trainers: weakref.WeakKeyDictionary[Any, dict[str, SeedLayerInstruments]] = weakref.WeakKeyDictionary()


def trainer_instruments(meter_provider: MeterProvider, settings: SeedLayerSettings,
                        identity: Mapping[str, str]) -> SeedLayerInstruments:
    """The instruments of the trainer ``identity`` on ``meter_provider``, opened for ``settings``.

    Raises ValueError when a trainer with the same identity exports there and is not closed.
    """
    scope = trainer_scope(identity)
    try:
        known = _trainers.setdefault(meter_provider, {})
    except TypeError:  # a provider that cannot be weakly referenced: nothing to share or compare with
        known = {}
    instruments = known.get(scope)
    if instruments is None:
        instruments = known[scope] = SeedLayerInstruments(meter_provider, identity)
    instruments.open(settings)
    return instruments


class SeedLayerInstruments:
    """Publishes one trainer's epoch summaries to observable gauges on its own meter."""

    def __init__(self, meter_provider: MeterProvider, identity: Mapping[str, str] | None = None) -> None:
        self._identity = dict(identity or {})
        self._lock = threading.Lock()
        self._is_open = False
        self._emit_layers = True
        self._top_k = 0
        self._points: dict[str, list[Observation]] = {}
        self._settings_info: list[Observation] = []
        self._previous_keys: set[_PointKey] = set()
        self._final_collections = -1  # collections that still export after close(); -1 while open
        scope = {TRAINER_SCOPE_ATTRIBUTE: trainer_scope(self._identity)} if self._identity else None
        meter = meter_provider.get_meter(METER_NAME, __version__, attributes=scope)
        self._gauges: list[ObservableGauge] = [
            meter.create_observable_gauge(
                SEED_NORM, [self._reader(SEED_NORM)], unit=UNIT,
                description="Per seed, RMS over the epoch's sampled optimizer steps of the L2 norm of all its "
                "gradients."),
            meter.create_observable_gauge(
                SEED_NOT_MEASURED, [self._reader(SEED_NOT_MEASURED)],
                unit="",  # unit-less: "1" would add a _ratio suffix in Prometheus
                description="1 for a seed that had no gradient at any sampled step of the epoch (not a zero "
                "gradient: none at all)."),
            meter.create_observable_gauge(
                SETTINGS_INFO, [self._reader(SETTINGS_INFO)], unit="",
                description="1 while the per-layer seed summaries are on; attributes give the effective settings."),
            meter.create_observable_gauge(
                SERIES_BUDGET, [self._reader(SERIES_BUDGET)], unit="",
                description="Per-layer series this trainer may export now: top_k x active seeds (0 in compact "
                "mode)."),
            # Created in compact mode too (they export nothing then, and the views drop them), so a
            # trainer that takes the identity over with other settings finds them.
            meter.create_observable_gauge(
                LAYER_NORM, [self._reader(LAYER_NORM)], unit=UNIT,
                description="Top-K layers per seed: RMS over the epoch's sampled optimizer steps of the "
                "L2 norm of the layer's direct parameters' gradients."),
            meter.create_observable_gauge(
                LAYER_NONFINITE, [self._reader(LAYER_NONFINITE)], unit="",
                description="1 for a top-K layer whose epoch gradient norm is NaN or Inf."),
        ]
        self._can_release = True

    def open(self, settings: SeedLayerSettings) -> None:
        with self._lock:
            if self._is_open:
                who = f"attributes {self._identity}" if self._identity else "no attributes"
                raise ValueError(f"a SeedLayerTelemetry with {who} already exports on this meter provider: give "
                                 "each trainer distinct attributes=, for example {'env_id': '1'}")
            self._is_open = True
            self._emit_layers = settings.emits_layers
            self._top_k = settings.top_k
            # The signal alert rules need to tell "feature on, nothing measured" from "feature off".
            self._settings_info = [Observation(1, {
                **self._identity, "enabled": "true", "top_k": str(settings.top_k),
                "compact": str(settings.compact).lower(), "sample_every": str(settings.sample_every)})]
            self._points = {SETTINGS_INFO: self._settings_info}
            self._final_collections = -1

    def publish(self, summary: EpochSummary) -> None:
        """Make ``summary`` the snapshot every later collection exports."""
        points = {name: _cap(name, obs) for name, obs in
                  snapshot_points(summary, self._emit_layers, self._identity).items()}
        points[SETTINGS_INFO] = self._settings_info
        points[SERIES_BUDGET] = [Observation(self._top_k * len(summary.seeds) if self._emit_layers else 0,
                                             self._identity)]
        keys = {_key(point.attributes) for observations in points.values() for point in observations}
        with self._lock:
            self._points = points
            keep = keys | self._previous_keys  # a collection running now may still observe the previous snapshot
            self._previous_keys = keys
        if self._can_release and not release_idle_attribute_sets(self._gauges, lambda a: _key(a) in keep):
            self._can_release = False
            _logger.warning("tolaria_otel: this OpenTelemetry SDK does not let the package release idle attribute "
                            "sets; a long run with many seeds may reach the cardinality limit (%d)",
                            STREAM_CARDINALITY_LIMIT)

    def close(self) -> None:
        """Export the latest snapshot at one more collection (the next export, a flush, or the
        provider's shutdown), then nothing: no I/O here, so the training thread never waits."""
        with self._lock:
            self._final_collections = 1
            self._is_open = False

    def _reader(self, name: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            with self._lock:
                if name == SEED_NORM and self._final_collections >= 0:  # the first callback of a collection
                    if self._final_collections == 0:
                        self._points = {}
                    else:
                        self._final_collections -= 1
                return self._points.get(name, [])

        return observe


def _key(attributes: Mapping[str, object] | None) -> _PointKey:
    return tuple(sorted((k, str(v)) for k, v in (attributes or {}).items()))


def _cap(name: str, points: Sequence[Observation]) -> list[Observation]:
    if len(points) <= STREAM_CARDINALITY_LIMIT:
        return list(points)
    _logger.warning("tolaria_otel: %d points for %s exceed the stream limit %d; keeping the first %d "
                    "(lower TOLARIA_SEED_LAYER_TOPK)", len(points), name, STREAM_CARDINALITY_LIMIT,
                    STREAM_CARDINALITY_LIMIT)
    return list(points[:STREAM_CARDINALITY_LIMIT])
