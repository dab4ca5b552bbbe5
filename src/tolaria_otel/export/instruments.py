"""The meter, the instruments and the views of the metric family ``tolaria.grad_agg.seed.*``.

All instruments are observable gauges that report the latest epoch's snapshot at each collection.
An observable gauge exports exactly the attribute sets its callback observed in that collection, so
a layer that left the top-K stops being exported at once. (A synchronous gauge, under the default
cumulative temporality, would keep exporting every attribute set it was ever given.)

Several trainers may share one ``MeterProvider`` (Esper runs several environments per process): the
provider has one meter and one set of instruments (``ProviderStreams``), and each trainer
(``SeedLayerInstruments``) its own snapshot, its identity attributes (for example ``env_id``) on every
point so that its series stay apart in any backend, and its own share of the streams' cardinality
limits. (A meter per trainer would make the SDK warn, for every instrument, that the views cause
conflicting metric identities.) An identity is free again once its trainer is closed, or collected
unclosed (``SeedLayerTelemetry`` closes it then), or replaced (``replace=True``).

Each epoch end starts an export of the provider off the training thread (``epoch_export``), so that
every epoch reaches the exporter whatever the export interval.

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
import gc
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
from .epoch_export import MANUAL, PULL, PUSH, EpochExport, delivery, on_export_thread
from .sdk_state import raise_cardinality_limits, record_counts, release_idle_attribute_sets

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


#: Per meter provider, its one meter and set of instruments, shared by the trainers on it.
_providers: weakref.WeakKeyDictionary[Any, ProviderStreams] = weakref.WeakKeyDictionary()


def trainer_instruments(
    meter_provider: MeterProvider,
    settings: SeedLayerSettings,
    identity: Mapping[str, str],
    *,
    replace: bool = False,
    export_each_epoch: bool = True,
    owner: object | None = None,
) -> SeedLayerInstruments:
    """The instruments of the trainer ``identity`` on ``meter_provider``, opened for ``settings``.

    ``owner`` (held weakly) is what ``replace=True`` closes: its ``close()`` is called. Raises ValueError when
    a trainer with the same identity is open there and ``replace`` is false.
    """
    try:
        streams = _providers.get(meter_provider)
        if streams is None:
            streams = _providers[meter_provider] = ProviderStreams(meter_provider, settings)
    except TypeError:  # a provider that cannot be weakly referenced: nothing to share or compare with
        streams = ProviderStreams(meter_provider, settings)
    return streams.open(settings, identity, replace=replace, export_each_epoch=export_each_epoch, owner=owner)


def _owner_of(identity: Mapping[str, str]) -> Callable[[Mapping[str, object]], bool]:
    """Whether an attribute set is one of the trainer ``identity``'s: its keys other than the points' own are
    exactly the identity."""
    wanted = dict(identity)

    def owns(attributes: Mapping[str, object]) -> bool:
        return {k: v for k, v in attributes.items() if k not in RESERVED_ATTRIBUTES} == wanted

    return owns


class ProviderStreams:
    """One meter and one set of instruments on a meter provider, shared by every trainer on it.

    One set, because the SDK compares every new stream with all the others of the provider and warns
    ("Views ... will cause conflicting metrics identities") for each instrument a second meter creates under
    the same name. Each trainer still has its own series (its identity on every point), its own snapshot,
    its own budget (with several trainers the streams' cardinality limits are raised to the sum of theirs)
    and its own release of idle attribute sets (only its own).
    """

    def __init__(self, meter_provider: MeterProvider, settings: SeedLayerSettings) -> None:
        self._lock = threading.Lock()
        self._trainers: list[SeedLayerInstruments] = []  # open ones, and closed ones not yet fully collected
        self.delivery = delivery(meter_provider)
        self.epoch_export = EpochExport(meter_provider, self._exports_done)
        self._warned_lost = False
        self._can_size = True
        meter = meter_provider.get_meter(METER_NAME, __version__)
        gauges: list[ObservableGauge] = [
            meter.create_observable_gauge(name, [self._reader(name)], unit=unit, description=description)
            for name, unit, description in _GAUGES
        ]
        # The advisory serves a provider without the package's views (with them, the view's buckets win):
        # the resolution of the settings of the provider's first trainer.
        resolution = settings.step_norm_histogram
        self.step_norm: Histogram = meter.create_histogram(
            SEED_STEP_NORM,
            unit=UNIT,
            explicit_bucket_boundaries_advisory=STEP_NORM_BOUNDARIES.get(resolution, STEP_NORM_BOUNDARIES["coarse"]),
            description="Per seed, the distribution of its per-step gradient L2 norm over the epoch's sampled "
            "optimizer steps; recorded at each epoch end (a value per step, at its bucket's upper bound).",
        )
        #: Every instrument (the SDK state of each is released as seeds come and go).
        self.streams: list[Asynchronous | Histogram] = [*gauges, self.step_norm]
        names = [name for name, _, _ in _GAUGES]
        self._layer_streams: list[Asynchronous | Histogram] = [
            gauge for name, gauge in zip(names, gauges) if name in _LAYER_INSTRUMENTS
        ]
        self._seed_streams: list[Asynchronous | Histogram] = [
            gauge for name, gauge in zip(names, gauges) if name not in _LAYER_INSTRUMENTS
        ]
        self._seed_streams.append(self.step_norm)

    def open(
        self,
        settings: SeedLayerSettings,
        identity: Mapping[str, str],
        *,
        replace: bool,
        export_each_epoch: bool,
        owner: object | None,
    ) -> SeedLayerInstruments:
        identity = dict(identity)
        for attempt in range(3):
            with self._lock:
                current = next((t for t in self._trainers if t.is_open and t.identity == identity), None)
                if current is None:
                    trainer = SeedLayerInstruments(self, identity, settings, export_each_epoch, owner)
                    self._trainers.append(trainer)
                    self._size_streams()
                    return trainer
            if replace:
                _logger.info(
                    "tolaria_otel: a SeedLayerTelemetry with %s replaces the open one on this meter provider "
                    "(replace=True), which is closed",
                    _who(identity),
                )
                current.close_owner()
            elif attempt == 0:
                gc.collect()  # one dropped unclosed but held in a reference cycle releases its identity here
            else:
                break
        raise ValueError(
            f"a SeedLayerTelemetry with {_who(identity)} is open on this meter provider, so this one cannot take "
            "that identity: close() the open one first, pass replace=True to close it and take its identity "
            "over, or give each trainer distinct attributes=, for example {'env_id': '1'}"
        )

    def _size_streams(self) -> None:
        """With several trainers, each stream's limit is the sum of the trainers' own (call with the lock)."""
        if len(self._trainers) < 2 or not self._can_size:
            return
        limits = [stream_limits(trainer.settings) for trainer in self._trainers]
        seed_limit, layer_limit = sum(limit[0] for limit in limits), sum(limit[1] for limit in limits)
        if not (
            raise_cardinality_limits(self._seed_streams, seed_limit)
            and raise_cardinality_limits(self._layer_streams, layer_limit)
        ):
            self._can_size = False
            _logger.warning(
                "tolaria_otel: this OpenTelemetry SDK does not let the package size the streams several "
                "trainers share; size the views for all of them (seed_layer_views with max_seeds x trainers)"
            )

    def _exports_done(self) -> None:
        """An epoch's export returned: the snapshots it collected are sent (or failed with the exporter's log)."""
        with self._lock:
            trainers = list(self._trainers)
        for trainer in trainers:
            trainer.export_done()

    def published(self, trainer: SeedLayerInstruments, lost_epoch: int | None) -> None:
        """After a trainer's epoch end: start its export, and say once that an epoch was never collected."""
        if lost_epoch is not None and self.delivery != MANUAL and not self._warned_lost:
            self._warned_lost = True
            if self.delivery == PULL:
                why = (
                    "in pull mode an epoch the scrape did not read cannot be pushed: epochs are shorter than the "
                    "scrape interval; scrape more often, or export over OTLP (OTEL_METRICS_EXPORTER=otlp)"
                )
            elif trainer.export_each_epoch:
                why = "epochs are shorter than one export takes"
            else:
                why = (
                    "epochs are shorter than the export interval (OTEL_METRIC_EXPORT_INTERVAL) and "
                    "export_each_epoch=False leaves the exports to it"
                )
            _logger.warning(
                "tolaria_otel: epoch %d of the trainer with %s was replaced by the next before any collection "
                "read it, so it is not in the store: %s (said once)",
                lost_epoch,
                _who(trainer.identity),
                why,
            )
        if trainer.export_each_epoch and self.delivery == PUSH:
            self.epoch_export.request()

    def _reader(self, name: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            with self._lock:
                trainers = list(self._trainers)
            points: list[Observation] = []
            done = []
            for trainer in trainers:
                points.extend(trainer.observe(name))
                if trainer.finished:
                    done.append(trainer)
            if done:
                with self._lock:
                    self._trainers = [t for t in self._trainers if t not in done]
            return points

        return observe


class SeedLayerInstruments:
    """Publishes one trainer's epoch summaries to the gauges its provider's trainers share."""

    def __init__(
        self,
        streams: ProviderStreams,
        identity: Mapping[str, str],
        settings: SeedLayerSettings,
        export_each_epoch: bool = True,
        owner: object | None = None,
    ) -> None:
        self.identity = dict(identity)
        self.settings = settings
        self.export_each_epoch = export_each_epoch
        self._shared = streams
        self._owner = None if owner is None else weakref.ref(owner)
        self._owns = _owner_of(self.identity)
        self._lock = threading.Lock()
        self._is_open = True
        self._emit_layers = settings.emits_layers
        self._max_seeds = settings.max_seeds
        self._record_steps = settings.step_norm_histogram != "off"
        self._warned_max_seeds = False
        # The signal alert rules need to tell "feature on, nothing measured" from "feature off".
        self._settings_info = [
            Observation(
                1,
                {
                    **self.identity,
                    "enabled": "true",
                    "top_k": str(settings.top_k),
                    "compact": str(settings.compact).lower(),
                    "sample_every": str(settings.sample_every),
                },
            )
        ]
        self._points: dict[str, list[Observation]] = {SETTINGS_INFO: self._settings_info}
        self._previous_keys: set[_PointKey] = set()
        self._epoch: int | None = None  # the epoch of the snapshot, None before the first
        self._collected = False  # whether some collection read the snapshot
        self._exported = False  # whether an epoch's export (the package's own) read it and returned
        self._export_read: int | None = None  # the epoch an epoch's export under way read
        self._final_collections = -1  # collections that still export after close(); -1 while open
        self._finished = False
        #: The instruments this trainer's points go to (shared with the provider's other trainers).
        self.streams = streams.streams
        self._step_norm = streams.step_norm

    @property
    def is_open(self) -> bool:
        with self._lock:
            return self._is_open

    @property
    def finished(self) -> bool:
        """Closed, and its last snapshot collected: it exports nothing any more."""
        with self._lock:
            return self._finished

    def publish(self, summary: EpochSummary) -> None:
        """Make ``summary`` (its first ``max_seeds`` seeds) the snapshot every later collection exports."""
        summary = self._exported_seeds(summary)
        points = snapshot_points(summary, self._emit_layers, self.identity)
        points[SETTINGS_INFO] = self._settings_info
        # Exactly the per-layer series this snapshot exports (a seed with fewer layers than top_k, or not
        # measured, exports fewer), so that the store's count of them can be checked against it.
        points[SERIES_BUDGET] = [Observation(len(points[LAYER_NORM]) + len(points[LAYER_NONFINITE]), self.identity)]
        keys = {_key(point.attributes) for observations in points.values() for point in observations}
        with self._lock:
            lost = self._epoch if self._epoch is not None and not self._collected else None
            self._points = points
            self._epoch, self._collected, self._exported, self._export_read = summary.epoch, False, False, None
            keep = keys | self._previous_keys  # a collection running now may still observe the previous snapshot
            steady = keys == self._previous_keys  # nothing became idle: the usual epoch, nothing to release
            self._previous_keys = keys
        if self._record_steps:
            self._record_distribution(summary)
        owns = self._owns
        if not steady and not release_idle_attribute_sets(self.streams, lambda a: not owns(a) or _key(a) in keep):
            _warn_release_once()
        self._shared.published(self, lost)

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
                    {**self.identity, "seed_id": seed.seed_id, "stage": seed.stage},
                    zip(BUCKET_VALUES, seed.step_norm_counts),
                )
                for seed in summary.seeds.values()
            ],
        )

    def close(self) -> None:
        """Export the latest snapshot at one more collection (the next export, a flush, or the
        provider's shutdown), then nothing: no I/O here, so the training thread never waits. An epoch
        the epoch's export already sent is not sent again (a shutdown against a hung collector would wait
        for a second export). The identity is free for another trainer from now on."""
        with self._lock:
            if self._is_open:
                self._final_collections = 0 if self._exported else 1
                self._is_open = False

    def close_owner(self) -> None:
        """Close what opened these instruments (``replace=True``): its ``close()``, or these instruments."""
        owner = None if self._owner is None else self._owner()
        close = getattr(owner, "close", None)
        if callable(close):
            close()
        self.close()

    def export_done(self) -> None:
        """The epoch's export that read this snapshot returned: shutdown need not send it again. (Until then a
        close() leaves it to the final collection: a shutdown racing the export must not lose the last epoch.)"""
        with self._lock:
            if self._export_read is not None and self._export_read == self._epoch:
                self._exported = True

    def observe(self, name: str) -> list[Observation]:
        """This trainer's points of ``name`` in a collection running now."""
        release = False
        with self._lock:
            if name == SEED_NORM:  # the first callback of a collection
                self._collected = True
                if on_export_thread():
                    self._export_read = self._epoch
                if self._final_collections == 0 and not self._finished:
                    self._points = {}
                    self._finished = release = True
                elif self._final_collections > 0:
                    self._final_collections -= 1
            points = list(self._points.get(name, ()))
        if release:  # the histogram is synchronous: its cumulative state would be exported for ever
            owns = self._owns
            release_idle_attribute_sets([self._step_norm], lambda attributes: not owns(attributes))
        return points


_release_warned = threading.Event()


def _warn_release_once() -> None:
    if not _release_warned.is_set():
        _release_warned.set()
        _logger.warning(
            "tolaria_otel: this OpenTelemetry SDK does not let the package release idle attribute "
            "sets; a long run with many seeds may reach the streams' cardinality limits"
        )


def _who(identity: Mapping[str, str]) -> str:
    return f"attributes {dict(identity)}" if identity else "no attributes"


def _key(attributes: Mapping[str, object] | None) -> _PointKey:
    return frozenset((attributes or {}).items())
