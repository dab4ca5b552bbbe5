"""SeedLayerTelemetry: ties the seed source, the reduction, the top-K and the instruments together."""

from __future__ import annotations

import logging
import math
import sys
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from opentelemetry import metrics
from opentelemetry.metrics import MeterProvider
from torch import nn
from torch.utils.hooks import RemovableHandle

from .distributed import RankReduction
from .epoch import HOST, TOTAL, EpochSums, Segment, SegmentKey, fold, module_parameters, segment_key
from .health import classify
from .instruments import RESERVED_ATTRIBUTES, SeedLayerInstruments, trainer_instruments
from .norms import FLUSH_EVERY, DeviceMoved
from .optimizer_hooks import EveryOptimizer, OptimizerSteps, unwrap_optimizer
from .seeds import SeedSource, SeedView, StageNames, read_seeds, validate_seeds
from .settings import SeedLayerSettings
from .summary import EpochSummary, SeedSummary
from .topk import top_k

_logger = logging.getLogger(__name__)


class SeedLayerTelemetry:
    """Per-seed, per-layer gradient norms of a training run, summarised per epoch.

    Call :meth:`observe_step` once per optimizer step, after the gradients are final (or let
    :meth:`attach` do it from optimizer step hooks), and :meth:`end_epoch` at each epoch end.
    The seed source is read at every sampled step (one call, then an identity check of the seed
    modules), so seeds may come and go at any step. With ``settings.enabled`` false nothing is
    installed or allocated and both return at once. Telemetry trouble (a failing seed source, an
    odd gradient) is logged, never raised into the training loop; bad arguments to the constructor
    are raised at once. Safe to call from several threads (one lock; uncontended on the step path).

    ``attributes`` identify the trainer when several share one process and one meter provider
    (``{"env_id": "3"}``): they go on every point. ``stage_names`` names ``int`` stages (a protobuf
    enum's ``Name``, or a mapping).
    """

    def __init__(
        self,
        model: nn.Module,
        seeds: SeedSource,
        *,
        settings: SeedLayerSettings | None = None,
        meter_provider: MeterProvider | None = None,
        attributes: Mapping[str, str] | None = None,
        stage_names: StageNames | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model is {type(model).__name__}: expected a torch.nn.Module")
        if settings is not None and not isinstance(settings, SeedLayerSettings):
            raise TypeError(f"settings is {type(settings).__name__}: expected a SeedLayerSettings "
                            "(SeedLayerSettings.from_env()) or None")
        if meter_provider is not None and not callable(getattr(meter_provider, "get_meter", None)):
            raise TypeError(f"meter_provider is {type(meter_provider).__name__}: expected an OpenTelemetry "
                            "MeterProvider (configure_meter_provider()) or None for the global one")
        identity = _checked_identity(attributes)
        if stage_names is not None and not (callable(stage_names) or isinstance(stage_names, Mapping)):
            raise TypeError(f"stage_names is {type(stage_names).__name__}: expected a mapping int -> str or a "
                            "callable such as a protobuf enum's Name")
        self.settings = SeedLayerSettings.from_env() if settings is None else settings
        self.model = model
        self.attributes = identity
        self.epoch = 0
        self.failures = 0
        self._enabled = self.settings.enabled
        if not self._enabled:
            return
        self._source = seeds
        self._stage_names = stage_names
        self._lock = threading.Lock()
        self._hooks: list[RemovableHandle] = []
        self._reported_failures: set[tuple[str, type]] = set()
        self._countdown = 1  # steps until the next sampled one; the first step is sampled
        self._sampled_steps = 0
        self._warned_unsampled = False
        # Under torch.distributed every rank reduces and one exports (docs/distributed.md); else None.
        self._ranks = RankReduction.current(self.settings.export_rank)
        seeds_now = read_seeds(seeds, stage_names)  # fail fast on a malformed source
        self._stages = {seed_id: view.stage for seed_id, view in seeds_now.items()}
        self._segments: dict[SegmentKey, Segment] = {}
        self._current = self._segment_for(seeds_now)
        self._instruments: SeedLayerInstruments | None = None
        if self._ranks is None or self._ranks.rank == self.settings.export_rank:
            provider = metrics.get_meter_provider() if meter_provider is None else meter_provider
            self._instruments = trainer_instruments(provider, self.settings, identity)

    @property
    def enabled(self) -> bool:
        return self._enabled

    @property
    def exports(self) -> bool:
        """True where the summaries are exported: the export rank, or the only process without torch.distributed."""
        return self._enabled and self._instruments is not None

    def observe_step(self) -> None:
        """Queue this optimizer step's gradient norms on the device. No host sync."""
        if not self._enabled:
            return
        self._observe(None)

    def _observe(self, precomputed: Mapping[int, torch.Tensor] | None) -> None:
        """A step, measured here or from the norms a caller computed already (``StepNorms.add_step``)."""
        self._countdown -= 1
        if self._countdown:
            return
        self._countdown = self.settings.sample_every
        with self._lock:
            try:
                segment = self._segment_now()
                try:
                    segment.add_step(self._sampled_steps, precomputed)
                except DeviceMoved:  # the model moved: measure this step on its new device
                    segment.absorb()  # what it measured so far, while its device is there
                    segment = self._current = self._segment_for(self._read_seeds())
                    segment.add_step(self._sampled_steps, precomputed)
                self._sampled_steps += 1
                if segment.norms.waiting >= FLUSH_EVERY:
                    segment.absorb()
            except Exception:  # noqa: BLE001 - telemetry must never stop training
                self._failed("observe_step")

    def attach(self, optimizer: object | None = None) -> RemovableHandle:
        """Observe optimizer steps from a step post-hook; ``handle.remove()`` detaches.

        With an optimizer (or a wrapper of one): every step of that optimizer. With none: every step
        of any optimizer in the process that holds a parameter of the model, once per training step,
        so replacing the optimizer changes nothing (``optimizer_hooks.EveryOptimizer``).
        """
        if not self._enabled:
            return RemovableHandle(OrderedDict())  # a handle whose remove() has nothing to do
        if optimizer is None:
            handle = EveryOptimizer(self.model, self.observe_step).handle
        else:
            handle = OptimizerSteps(unwrap_optimizer(optimizer), self.observe_step).handle
        self._hooks.append(handle)
        return handle

    def end_epoch(self) -> EpochSummary | None:
        """Reduce the epoch (one device-to-host copy), publish its top-K and return the summary."""
        if not self._enabled:
            return None
        with self._lock:
            summary = EpochSummary(self.epoch, self._sampled_steps, self.settings.top_k, {})
            try:
                summary = self._summarise()
                if self._instruments is not None:
                    self._instruments.publish(summary)
            except Exception:  # noqa: BLE001
                self._failed("end_epoch")
            self.epoch += 1
            self._sampled_steps = 0
            for segment in self._segments.values():
                segment.reset()
            self._segments = {self._current.key: self._current}
        return summary

    def close(self) -> None:
        """Detach from the optimizers and stop exporting after the next collection, which still
        carries the last epoch (the next periodic export, a ``force_flush()`` or the provider's
        shutdown). Returns at once: no I/O on the training thread. The provider stays the
        caller's to shut down."""
        if not self._enabled:
            return
        for hook in self._hooks:
            hook.remove()
        if self._instruments is not None:
            self._instruments.close()
        self._enabled = False

    def __enter__(self) -> SeedLayerTelemetry:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _segment_now(self) -> Segment:
        """The segment for the seeds the source lists now: one call of the source and an identity
        check of its modules; a walk over parameters only when a seed came, went or was swapped."""
        try:
            mapping = self._source() if callable(self._source) else self._source
            if self._current.lists_same_modules(mapping):
                return self._current
            views = validate_seeds(mapping, self._stage_names)
        except Exception:  # noqa: BLE001 - measure the seeds known last rather than nothing
            self._failed("seed source")
            return self._current
        self._current = self._segment_for(views)
        return self._current

    def _segment_for(self, seeds: Mapping[str, SeedView]) -> Segment:
        host = self._host_parameters(seeds) if self.settings.host_norm else ()
        key = segment_key(seeds, host)
        segment = self._segments.get(key)
        if segment is None:
            segment = self._segments[key] = Segment(
                seeds, key, host=host, keep_rows=self._ranks is not None,
                tensor_bounds=(self.settings.tensor_vanishing_below, self.settings.tensor_exploding_above))
        return segment

    def _host_parameters(self, seeds: Mapping[str, SeedView]) -> list[nn.Parameter]:
        """Every trainable parameter of the model that belongs to no seed (walked only when a seed
        came, went or was swapped, and at epoch ends)."""
        in_seeds = {id(p) for view in seeds.values() for p in module_parameters(view.module)}
        return [p for p in module_parameters(self.model) if p.requires_grad and id(p) not in in_seeds]

    def _read_seeds(self) -> dict[str, SeedView]:
        return read_seeds(self._source, self._stage_names)

    def _summarise(self) -> EpochSummary:
        steps = self._sampled_steps
        try:
            seeds_now = self._read_seeds()
            self._stages = {seed_id: view.stage for seed_id, view in seeds_now.items()}
            # Parameters frozen, unfrozen or added in place are seen here (the step path checks modules only).
            self._current = self._segment_for(seeds_now)
        except Exception:  # noqa: BLE001 - keep the last known seeds and stages
            self._failed("seed source")
        stages: Mapping[str, str] = self._stages
        segments = list(self._segments.values())
        home = self._current.home
        sums: EpochSums | None = None
        if self._ranks is not None:  # on every rank at every epoch end: the others wait in the all-reduce
            sums, stages = self._ranks.reduce(segments, steps, stages, home)
            steps = sums.steps
        elif steps:
            sums = fold(segments, home, steps)  # the epoch's one host sync
        if not steps and self._stages:
            _logger.log(logging.DEBUG if self._warned_unsampled else logging.WARNING,
                        "tolaria_otel: epoch %d had no sampled step (sample_every=%d); nothing to report",
                        self.epoch, self.settings.sample_every)
            self._warned_unsampled = True
        if sums is None or not steps:
            return EpochSummary(self.epoch, steps, self.settings.top_k, {})
        by_seed = _slot_values(sums)
        host = by_seed.get(HOST, {}).get(TOTAL)
        host_norm = host.rms if host is not None else None
        return EpochSummary(self.epoch, steps, self.settings.top_k,
                            self._seed_summaries(sums, by_seed, stages, host), host_norm)

    def _seed_summaries(self, sums: EpochSums, by_seed: Mapping[str, dict[str, _SlotValues]],
                        stages: Mapping[str, str], host: _SlotValues | None) -> dict[str, SeedSummary]:
        """Every seed listed at the epoch end that was listed at some sampled step of it."""
        seeds = {}
        for seed_id, stage in stages.items():
            if not sums.seed_steps.get(seed_id):
                continue  # listed only after the last sampled step: measured from the next epoch on
            slots = dict(by_seed.get(seed_id, {}))
            total = slots.pop(TOTAL, None)
            measured = total is not None and total.rms is not None
            layers = {layer: values.rms for layer, values in slots.items()}
            layer_max = {layer: values.max for layer, values in slots.items()}
            ratio = None
            if measured and host is not None and host.rms and total.numel:  # type: ignore[union-attr]
                # Esper's lifecycle gate: the seed's gradient against the host's, per parameter.
                ratio = (total.rms / host.rms) * math.sqrt(host.numel / total.numel)  # type: ignore[union-attr,operator]
            total_norm = total.rms if measured else None  # type: ignore[union-attr]
            max_norm = total.max if measured else None  # type: ignore[union-attr]
            nonfinite_steps = total.nonfinite if total is not None else 0
            seeds[seed_id] = SeedSummary(
                seed_id=seed_id, stage=stage, total_norm=total_norm,
                top_layers=top_k({k: v for k, v in layers.items() if v is not None}, self.settings.top_k)
                if measured else (),
                layer_count=len(slots),
                sampled_steps=sums.seed_steps[seed_id],
                max_norm=max_norm, layer_norms=layers, layer_max=layer_max, nonfinite_steps=nonfinite_steps,
                step_norm_counts=sums.counts.get(seed_id, ()) if measured else (),
                host_ratio=ratio,
                health=classify(total_norm, max_norm, layers.values(), nonfinite_steps),
                gradient_tensors=total.tensors if total is not None else 0,
                vanishing_tensor_steps=total.vanishing if total is not None else 0,
                exploding_tensor_steps=total.exploding if total is not None else 0,
            )
        return seeds

    def _failed(self, where: str) -> None:
        self.failures += 1
        kind = (where, type(sys.exc_info()[1]))
        first = kind not in self._reported_failures
        self._reported_failures.add(kind)
        _logger.log(logging.WARNING if first else logging.DEBUG,
                    "tolaria_otel: %s failed; training goes on without this measurement", where,
                    exc_info=first)


@dataclass(frozen=True)
class _SlotValues:
    rms: float | None  # None: not measured
    max: float | None
    nonfinite: int
    numel: int
    tensors: int | None  # None: not known (the reduction did not carry it)
    vanishing: int | None  # None: not counted
    exploding: int | None


def _slot_values(sums: EpochSums) -> dict[str, dict[str, _SlotValues]]:
    """Per seed, its slots by layer (``TOTAL`` for the seed's total): RMS and largest step over its steps."""
    out: dict[str, dict[str, _SlotValues]] = {}
    for i, (seed, layer) in enumerate(sums.slots):
        steps = sums.seed_steps.get(seed, 0)
        measured = sums.measured[i] and steps > 0
        out.setdefault(seed, {})[layer] = _SlotValues(
            math.sqrt(sums.sums[i] / steps) if measured else None,
            math.sqrt(sums.maxima[i]) if measured else None, sums.nonfinite[i], sums.numel[i],
            sums.tensors[i] if sums.tensors else None,
            sums.vanishing[i] if sums.vanishing is not None else None,
            sums.exploding[i] if sums.exploding is not None else None)
    return out


def _checked_identity(attributes: Mapping[str, str] | None) -> dict[str, str]:
    if attributes is None:
        return {}
    if not isinstance(attributes, Mapping):
        raise TypeError(f"attributes is {type(attributes).__name__}: expected a mapping str -> str, "
                        "for example {'env_id': '3'}")
    for key, value in attributes.items():
        if not isinstance(key, str) or not key or not isinstance(value, str):
            raise TypeError(f"attributes[{key!r}] = {value!r}: expected non-empty str keys and str values")
        if key in RESERVED_ATTRIBUTES:
            raise ValueError(f"attributes[{key!r}]: {key!r} is one of the package's own attributes "
                             f"({', '.join(sorted(RESERVED_ATTRIBUTES))}); name the trainer with another key, "
                             "for example env_id")
    return dict(attributes)
