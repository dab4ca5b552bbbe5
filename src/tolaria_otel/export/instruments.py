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

Volume is bounded by the settings: a trainer exports at most ``TOLARIA_SEED_LAYER_MAX_SEEDS`` seeds
(the first by seed id; it warns once when it leaves some out), and the views size every stream's
cardinality limit for that many seeds at ``top_k`` layers, current and previous snapshot together, so
the SDK never folds a point into its overflow series. The per-step seed norm histogram is counted on
the device in the fine buckets of ``config.histogram.HISTOGRAM_BOUNDARIES`` and exported in the buckets
``TOLARIA_SEED_STEP_NORM_HISTOGRAM`` chooses (a subset of the fine bounds, so every exported bucket
count is exact). ``volume.trainer_series`` counts what all this costs in a store.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import logging
import math
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from opentelemetry.metrics import Asynchronous, CallbackOptions, Histogram, MeterProvider, ObservableGauge, Observation

from .._version import __version__
from ..config.histogram import BUCKET_VALUES, STEP_NORM_BOUNDARIES
from ..config.settings import ENV_MAX_SEEDS, ENV_TOP_K, SeedLayerSettings
from ..summary.epoch_summary import EpochSummary
from .sdk_state import record_counts, release_idle_attribute_sets

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics.view import Aggregation, View

LAYER_NORM = "tolaria.grad_agg.seed.layer_norm"
LAYER_NORM_MAX = "tolaria.grad_agg.seed.layer_norm_max"
LAYER_NONFINITE = "tolaria.grad_agg.seed.layer_nonfinite"
SEED_NORM = "tolaria.grad_agg.seed.norm"
SEED_NORM_MAX = "tolaria.grad_agg.seed.norm_max"
SEED_STEP_NORM = "tolaria.grad_agg.seed.step_norm"
SEED_HOST_RATIO = "tolaria.grad_agg.seed.host_ratio"
SEED_NOT_MEASURED = "tolaria.grad_agg.seed.not_measured"
HOST_NORM = "tolaria.grad_agg.host.norm"
SETTINGS_INFO = "tolaria.grad_agg.seed_layer.info"
SERIES_BUDGET = "tolaria.grad_agg.seed_layer.series_budget"
CLIPPED_STEPS = "tolaria.grad_agg.clip.clipped_steps"
CLIP_STEPS = "tolaria.grad_agg.clip.steps"
MIN_CLIP_FACTOR = "tolaria.grad_agg.clip.min_factor"
SEED_CLIPPED_STEPS = "tolaria.grad_agg.seed.clip.clipped_steps"
SEED_MIN_CLIP_FACTOR = "tolaria.grad_agg.seed.clip.min_factor"
UNIT = "grad"
METER_NAME = "tolaria_otel"
TRAINER_SCOPE_ATTRIBUTE = "tolaria.otel.trainer"

LAYER_ATTRIBUTES = frozenset({"seed_id", "stage", "layer"})
SEED_ATTRIBUTES = frozenset({"seed_id", "stage"})
SETTINGS_ATTRIBUTES = frozenset({"enabled", "top_k", "compact", "sample_every"})
#: Attribute keys a trainer identity may not use: they are the points' own.
RESERVED_ATTRIBUTES = LAYER_ATTRIBUTES | SETTINGS_ATTRIBUTES

_logger = logging.getLogger(__name__)
_LAYER_INSTRUMENTS = (LAYER_NORM, LAYER_NORM_MAX, LAYER_NONFINITE)
_SEED_GAUGES = (
    SEED_NORM,
    SEED_NORM_MAX,
    SEED_HOST_RATIO,
    SEED_NOT_MEASURED,
    HOST_NORM,
    SEED_CLIPPED_STEPS,
    SEED_MIN_CLIP_FACTOR,
)
_PointKey = frozenset[tuple[str, object]]

#: Every gauge of a trainer: name, unit, description. The unit-less ones have unit "" ("1" would add a
#: _ratio suffix in Prometheus). The layer gauges exist in compact mode too (they export nothing then,
#: and the views drop them), so a trainer that takes an identity over with other settings finds them.
#: SEED_NORM comes first: its callback, the first of a collection, counts the collections after close().
_GAUGES = (
    (SEED_NORM, UNIT, "Per seed, RMS over the epoch's sampled optimizer steps of the L2 norm of all its gradients."),
    (
        SEED_NORM_MAX,
        UNIT,
        "Per seed, the largest per-step L2 norm of all its gradients over the epoch's sampled "
        "optimizer steps (a spike the RMS hides).",
    ),
    (
        SEED_HOST_RATIO,
        "",
        "Per seed, (seed norm / host norm) x sqrt(host parameters / seed parameters), epoch RMS "
        "norms (TOLARIA_SEED_HOST_NORM).",
    ),
    (
        HOST_NORM,
        UNIT,
        "The host's gradient norm (every trainable parameter outside the seeds), RMS over the epoch's "
        "sampled optimizer steps (TOLARIA_SEED_HOST_NORM).",
    ),
    (
        SEED_NOT_MEASURED,
        "",
        "1 for a seed that had no gradient at any sampled step of the epoch (not a zero gradient: none at all).",
    ),
    (SETTINGS_INFO, "", "1 while the per-layer seed summaries are on; attributes give the effective settings."),
    (SERIES_BUDGET, "", "Per-layer series this trainer may export now: top_k x active seeds (0 in compact mode)."),
    (
        LAYER_NORM,
        UNIT,
        "Top-K layers per seed: RMS over the epoch's sampled optimizer steps of the L2 norm of the "
        "layer's direct parameters' gradients.",
    ),
    (
        LAYER_NORM_MAX,
        UNIT,
        "Top-K layers per seed (ranked by RMS): the largest per-step L2 norm of the layer's "
        "direct parameters' gradients over the epoch's sampled optimizer steps.",
    ),
    (LAYER_NONFINITE, "", "1 for a top-K layer whose epoch gradient norm is NaN or Inf."),
    (
        CLIP_STEPS,
        "",
        "Sampled optimizer steps of the epoch at which the package saw a gradient clip (exported "
        "only in epochs with one).",
    ),
    (
        CLIPPED_STEPS,
        "",
        "Sampled optimizer steps of the epoch whose gradient clip scaled the gradients down; the "
        "norms are measured before it.",
    ),
    (
        MIN_CLIP_FACTOR,
        "",
        "The smallest factor the gradient clip applied in the epoch's sampled steps, "
        "min(max_norm / (total + 1e-6), 1); 1 when it never scaled.",
    ),
    (
        SEED_CLIPPED_STEPS,
        "",
        "Per seed with a clip of its own parameters only (one clip_grad_norm_ per seed): sampled optimizer "
        "steps of the epoch that clip scaled down (exported only in epochs with one).",
    ),
    (
        SEED_MIN_CLIP_FACTOR,
        "",
        "Per seed with a clip of its own parameters only: the smallest factor that clip applied in the "
        "epoch's sampled steps, min(max_norm / (total + 1e-6), 1); 1 when it never scaled.",
    ),
)


def seed_layer_views(settings: SeedLayerSettings | None = None) -> list[View]:
    """Views for an application that builds its own ``MeterProvider``.

    They size each stream's cardinality limit for the settings (:func:`stream_limits`), set the step
    norm histogram's buckets (or drop it) and, in compact mode, drop the per-layer instruments. They
    keep every attribute the package gives (the contract's, plus a trainer's identity). Build them from
    the settings the trainers use: streams sized for fewer seeds or a smaller top_k than a trainer
    exports would fold its points into the SDK's overflow series.

    An SDK whose views take no cardinality limit (before 1.45.2) has none at all: the views set none,
    and the first call in a process says once that ``max_seeds`` and ``top_k`` are then the only bound.
    """
    # The SDK, imported here only: a trainer that takes its provider from elsewhere needs just the API.
    from opentelemetry.sdk.metrics.view import DropAggregation, ExplicitBucketHistogramAggregation, View

    settings = SeedLayerSettings.from_env() if settings is None else settings
    seed_limit: int | None
    layer_limit: int | None
    seed_limit, layer_limit = stream_limits(settings)
    if not _views_take_cardinality_limit(View):
        _warn_no_cardinality_limit(seed_limit, layer_limit)
        seed_limit = layer_limit = None

    def view(name: str, limit: int | None, aggregation: Aggregation | None = None) -> View:
        if limit is None:
            return View(instrument_name=name, aggregation=aggregation)
        return View(instrument_name=name, aggregation=aggregation, aggregation_cardinality_limit=limit)

    views = [view(name, seed_limit) for name in (*_SEED_GAUGES, SETTINGS_INFO, SERIES_BUDGET)]
    boundaries = STEP_NORM_BOUNDARIES.get(settings.step_norm_histogram)
    if boundaries is None:
        views.append(view(SEED_STEP_NORM, None, DropAggregation()))
    else:
        views.append(view(SEED_STEP_NORM, seed_limit, ExplicitBucketHistogramAggregation(boundaries)))
    views.extend(
        view(name, None, DropAggregation()) if settings.compact else view(name, layer_limit)
        for name in _LAYER_INSTRUMENTS
    )
    return views


def _views_take_cardinality_limit(view: type[View]) -> bool:
    """Whether the SDK's ``View`` takes ``aggregation_cardinality_limit`` (1.45.2 on; older SDKs limit nothing)."""
    return "aggregation_cardinality_limit" in inspect.signature(view).parameters


#: Holds True once the process said that its SDK's views take no cardinality limit.
_warned_no_limit: list[bool] = []


def _warn_no_cardinality_limit(seed_limit: int, layer_limit: int) -> None:
    if _warned_no_limit:
        return
    _warned_no_limit.append(True)
    _logger.warning(
        "tolaria_otel: this OpenTelemetry SDK's views take no cardinality limit: %s and %s are the only bound "
        "on the series (a per-seed stream holds at most %d attribute sets, a per-layer one %d) (said once)",
        ENV_MAX_SEEDS,
        ENV_TOP_K,
        seed_limit,
        layer_limit,
    )


def stream_limits(settings: SeedLayerSettings) -> tuple[int, int]:
    """The cardinality limits of a per-seed stream and of a per-layer stream.

    Between two epoch ends the SDK holds the attribute sets of the current and of the previous snapshot
    (the idle ones are released at the next), each at most ``max_seeds`` seeds of ``top_k`` layers.
    """
    seeds = 2 * settings.max_seeds
    return seeds, seeds * settings.top_k


def snapshot_points(
    summary: EpochSummary, emit_layers: bool, identity: Mapping[str, str] | None = None
) -> dict[str, list[Observation]]:
    """The points an epoch summary exports, per instrument.

    Non-finite values go to ``layer_nonfinite`` (value 1) because the SDK drops, with a warning,
    any non-finite measurement; a non-finite seed total is left out for the same reason. A seed
    that had no gradient in the epoch exports ``seed.not_measured`` = 1 and no norm at all.
    """
    identity = identity or {}
    points: dict[str, list[Observation]] = {name: [] for name in (*_LAYER_INSTRUMENTS, *_SEED_GAUGES)}

    def add(name: str, value: float | None, attributes: dict[str, str]) -> None:
        if value is not None and math.isfinite(value):  # the SDK would drop it with a warning
            points[name].append(Observation(value, attributes))

    if summary.host_norm is not None:
        add(HOST_NORM, summary.host_norm, dict(identity))
    points[CLIP_STEPS], points[CLIPPED_STEPS], points[MIN_CLIP_FACTOR] = [], [], []
    if summary.min_clip_factor is not None:  # a clip was seen: the trainer's clip facts
        add(CLIP_STEPS, summary.clip_steps, dict(identity))
        add(CLIPPED_STEPS, summary.clipped_steps, dict(identity))
        add(MIN_CLIP_FACTOR, summary.min_clip_factor, dict(identity))
    for seed in summary.seeds.values():
        seed_attributes = {**identity, "seed_id": seed.seed_id, "stage": seed.stage}
        if seed.min_clip_factor is not None:  # a clip of the seed's own parameters was seen: its own facts
            add(SEED_CLIPPED_STEPS, seed.clipped_steps, seed_attributes)
            add(SEED_MIN_CLIP_FACTOR, seed.min_clip_factor, seed_attributes)
        if seed.total_norm is None:
            points[SEED_NOT_MEASURED].append(Observation(1, seed_attributes))
            continue
        add(SEED_NORM, seed.total_norm, seed_attributes)
        add(SEED_NORM_MAX, seed.max_norm, seed_attributes)
        add(SEED_HOST_RATIO, seed.host_ratio, seed_attributes)
        if not emit_layers:
            continue
        for layer, value in seed.top_layers:
            attributes = {**seed_attributes, "layer": layer}
            if math.isfinite(value):
                points[LAYER_NORM].append(Observation(value, attributes))
                add(LAYER_NORM_MAX, seed.layer_max.get(layer), attributes)
            else:
                points[LAYER_NONFINITE].append(Observation(1, attributes))
    return points


def trainer_scope(identity: Mapping[str, str]) -> str:
    """The identity as one scope attribute value: ``env_id=3,host=a`` (keys sorted)."""
    return ",".join(f"{key}={value}" for key, value in sorted(identity.items()))


#: Per meter provider, each trainer identity's instruments: created once, reused by a trainer that
#: takes over an identity after close() (the SDK would ignore a second instrument of the same name).
_trainers: weakref.WeakKeyDictionary[Any, dict[str, SeedLayerInstruments]] = weakref.WeakKeyDictionary()


def trainer_instruments(
    meter_provider: MeterProvider, settings: SeedLayerSettings, identity: Mapping[str, str]
) -> SeedLayerInstruments:
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
        instruments = known[scope] = SeedLayerInstruments(meter_provider, identity, settings)
    instruments.open(settings)
    return instruments


class SeedLayerInstruments:
    """Publishes one trainer's epoch summaries to observable gauges on its own meter."""

    def __init__(
        self,
        meter_provider: MeterProvider,
        identity: Mapping[str, str] | None = None,
        settings: SeedLayerSettings | None = None,
    ) -> None:
        self._identity = dict(identity or {})
        self._lock = threading.Lock()
        self._is_open = False
        self._emit_layers = True
        self._max_seeds = 0
        self._record_steps = True
        self._warned_max_seeds = False
        self._points: dict[str, list[Observation]] = {}
        self._settings_info: list[Observation] = []
        self._previous_keys: set[_PointKey] = set()
        self._final_collections = -1  # collections that still export after close(); -1 while open
        scope = {TRAINER_SCOPE_ATTRIBUTE: trainer_scope(self._identity)} if self._identity else None
        meter = meter_provider.get_meter(METER_NAME, __version__, attributes=scope)
        gauges: list[ObservableGauge] = [
            meter.create_observable_gauge(name, [self._reader(name)], unit=unit, description=description)
            for name, unit, description in _GAUGES
        ]
        # The advisory serves a provider without the package's views (with them, the view's buckets win):
        # the resolution of the settings this identity was first opened with.
        resolution = (settings or SeedLayerSettings()).step_norm_histogram
        self._step_norm: Histogram = meter.create_histogram(
            SEED_STEP_NORM,
            unit=UNIT,
            explicit_bucket_boundaries_advisory=STEP_NORM_BOUNDARIES.get(resolution, STEP_NORM_BOUNDARIES["coarse"]),
            description="Per seed, the distribution of its per-step gradient L2 norm over the epoch's sampled "
            "optimizer steps; recorded at each epoch end (a value per step, at its bucket's upper bound).",
        )
        #: Every instrument of this trainer (the SDK state of each is released as seeds come and go).
        self.streams: list[Asynchronous | Histogram] = [*gauges, self._step_norm]
        self._can_release = True

    def open(self, settings: SeedLayerSettings) -> None:
        with self._lock:
            if self._is_open:
                who = f"attributes {self._identity}" if self._identity else "no attributes"
                raise ValueError(
                    f"a SeedLayerTelemetry with {who} already exports on this meter provider: give "
                    "each trainer distinct attributes=, for example {'env_id': '1'}"
                )
            self._is_open = True
            self._emit_layers = settings.emits_layers
            self._max_seeds = settings.max_seeds
            self._record_steps = settings.step_norm_histogram != "off"
            # The signal alert rules need to tell "feature on, nothing measured" from "feature off".
            self._settings_info = [
                Observation(
                    1,
                    {
                        **self._identity,
                        "enabled": "true",
                        "top_k": str(settings.top_k),
                        "compact": str(settings.compact).lower(),
                        "sample_every": str(settings.sample_every),
                    },
                )
            ]
            self._points = {SETTINGS_INFO: self._settings_info}
            self._final_collections = -1

    def publish(self, summary: EpochSummary) -> None:
        """Make ``summary`` (its first ``max_seeds`` seeds) the snapshot every later collection exports."""
        summary = self._exported_seeds(summary)
        points = snapshot_points(summary, self._emit_layers, self._identity)
        points[SETTINGS_INFO] = self._settings_info
        # Exactly the per-layer series this snapshot exports (a seed with fewer layers than top_k, or not
        # measured, exports fewer), so that the store's count of them can be checked against it.
        points[SERIES_BUDGET] = [Observation(len(points[LAYER_NORM]) + len(points[LAYER_NONFINITE]), self._identity)]
        keys = {_key(point.attributes) for observations in points.values() for point in observations}
        with self._lock:
            self._points = points
            keep = keys | self._previous_keys  # a collection running now may still observe the previous snapshot
            steady = keys == self._previous_keys  # nothing became idle: the usual epoch, nothing to release
            self._previous_keys = keys
        if self._record_steps:
            self._record_distribution(summary)
        if (
            not steady
            and self._can_release
            and not release_idle_attribute_sets(self.streams, lambda a: _key(a) in keep)
        ):
            self._can_release = False
            _logger.warning(
                "tolaria_otel: this OpenTelemetry SDK does not let the package release idle attribute "
                "sets; a long run with many seeds may reach the streams' cardinality limits"
            )

    def _exported_seeds(self, summary: EpochSummary) -> EpochSummary:
        """``summary`` with its first ``max_seeds`` seeds (by seed id), warning once when that leaves some out."""
        if len(summary.seeds) <= self._max_seeds:
            return summary
        kept = dict(itertools.islice(summary.seeds.items(), self._max_seeds))
        if not self._warned_max_seeds:
            self._warned_max_seeds = True
            first_left = next(seed_id for seed_id in summary.seeds if seed_id not in kept)
            _logger.warning(
                "tolaria_otel: %d seeds at epoch %d, %s=%d: the %d from seed %r on are not exported "
                "(the EpochSummary has them all); raise %s to export them (said once)",
                len(summary.seeds),
                summary.epoch,
                ENV_MAX_SEEDS,
                self._max_seeds,
                len(summary.seeds) - self._max_seeds,
                first_left,
                ENV_MAX_SEEDS,
            )
        return dataclasses.replace(summary, seeds=kept)

    def _record_distribution(self, summary: EpochSummary) -> None:
        """The epoch's per-step seed norms, from the device's bucket counts: each step recorded at its
        bucket's upper bound, so the exported buckets are exact and the sum is an upper bound."""
        record_counts(
            self._step_norm,
            [
                (
                    {**self._identity, "seed_id": seed.seed_id, "stage": seed.stage},
                    zip(BUCKET_VALUES, seed.step_norm_counts),
                )
                for seed in summary.seeds.values()
            ],
        )

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
                        # The histogram is synchronous: its cumulative state would be exported for ever.
                        release_idle_attribute_sets([self._step_norm], lambda attributes: False)
                    else:
                        self._final_collections -= 1
                return self._points.get(name, [])

        return observe


def _key(attributes: Mapping[str, object] | None) -> _PointKey:
    return frozenset((attributes or {}).items())
