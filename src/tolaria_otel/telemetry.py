"""SeedLayerTelemetry: ties the seed source, the reduction, the top-K and the instruments together."""

from __future__ import annotations

import itertools
import logging
import math
import sys
import threading
from collections import OrderedDict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from opentelemetry import metrics
from opentelemetry.metrics import MeterProvider
from torch import nn
from torch.utils.hooks import RemovableHandle

from .clipping import ClipFacts, PreClipStep, attach_clip_patch, clip_and_stage, l2_norms, warn_unreachable_clip
from .distributed import RankReduction
from .epoch import HOST, TOTAL, EpochSums, Segment, SegmentKey, fold, module_parameters, segment_key
from .health import classify
from .instruments import RESERVED_ATTRIBUTES, SeedLayerInstruments, trainer_instruments
from .norms import FLUSH_EVERY, DeviceMoved
from .optimizer_hooks import EveryOptimizer, OptimizerSteps, unwrap_optimizer
from .seeds import SeedSource, SeedView, StageNames, read_seeds, stage_name, validate_seeds
from .settings import SeedLayerSettings
from .summary import EpochSummary, SeedSummary
from .topk import top_k

_logger = logging.getLogger(__name__)

#: Sampled steps between two walks over the seeds' parameters that find a parameter replaced or added
#: inside a seed module (a walk per step would cost more than the step's measurement; docs/benchmarks.md).
PARAMETER_CHECK_EVERY = 64


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
            raise TypeError(
                f"settings is {type(settings).__name__}: expected a SeedLayerSettings "
                "(SeedLayerSettings.from_env()) or None"
            )
        if meter_provider is not None and not callable(getattr(meter_provider, "get_meter", None)):
            raise TypeError(
                f"meter_provider is {type(meter_provider).__name__}: expected an OpenTelemetry "
                "MeterProvider (configure_meter_provider()) or None for the global one"
            )
        identity = _checked_identity(attributes)
        if stage_names is not None and not (callable(stage_names) or isinstance(stage_names, Mapping)):
            raise TypeError(
                f"stage_names is {type(stage_names).__name__}: expected a mapping int -> str or a "
                "callable such as a protobuf enum's Name"
            )
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
        # Measuring before the clip (clipping.py): the step's norms wait here for the step that commits them.
        self._pre_clip = PreClipStep()
        self._clip_facts = ClipFacts(FLUSH_EVERY)
        self._clip_patch: object | None = None
        self._model_ids: frozenset[int] | None = None
        self._ids_of: tuple[Segment, list[int]] | None = None
        seeds_now = read_seeds(seeds, stage_names)  # fail fast on a malformed source
        self._stages = {seed_id: view.stage for seed_id, view in seeds_now.items()}
        #: Every seed listed at some point of this epoch, with the last stage seen: a seed culled
        #: mid-epoch keeps its place in the epoch's summary.
        self._epoch_stages = dict(self._stages)
        self._last_mapping: object = None  # what the source returned at the last sampled step
        self._partial: set[str] = set()  # seeds with parameters replaced or added in place this epoch
        self._model_parameters: set[int] = set()
        self._warned_outside: set[str] = set()
        self._segments: dict[SegmentKey, Segment] = {}
        self._current = self._segment_for(seeds_now)
        if self._ranks is not None:  # on every rank: which slots the sharded steps' chunks carry
            self._ranks.begin(self._current)
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
        """Queue this optimizer step's gradient norms on the device. No host sync.

        Call it after the optimizer step (or before it, when nothing clips). Norms a clip took
        before it scaled (:meth:`clip_grad_norm_`, or ``torch.nn.utils.clip_grad_norm_`` while
        attached) are this step's values: the gradients are measured before clipping.
        """
        if not self._enabled:
            return
        if not self._pre_clip.waiting:
            self._observe(None)
            return
        norms, factors = self._pre_clip.take()
        self._observe(norms, factors)

    def clip_grad_norm_(
        self,
        parameters: torch.Tensor | Iterable[torch.Tensor],
        max_norm: float,
        norm_type: float = 2.0,
        error_if_nonfinite: bool = False,
        foreach: bool | None = None,
    ) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` that measures this step before it clips, in one pass.

        The per-gradient norms the clip takes anyway are this step's values, and its factor
        (``min(max_norm / (total + 1e-6), 1)``) goes into the epoch's clip facts; the next
        :meth:`observe_step` (or the attached optimizer's step) commits them, so a step that
        ``GradScaler`` skips is not counted. Returns what torch returns, equal to it for float32 and
        float64 gradients; float16 and bfloat16 gradients are normed in float32 here (torch norms them
        in their own precision), so the total and factor differ from torch's by that rounding.
        With the telemetry off, or at a step that is not sampled, it is torch's function.
        """
        original = torch.nn.utils.clip_grad.clip_grad_norm_  # torch's own, never the patch
        if not self._enabled or self._countdown != 1:
            return original(
                parameters, max_norm, norm_type=norm_type, error_if_nonfinite=error_if_nonfinite, foreach=foreach
            )
        return clip_and_stage(parameters, max_norm, norm_type, error_if_nonfinite, foreach, [self], original)

    def _observe(
        self, precomputed: Mapping[int, torch.Tensor] | None, clip_factors: Sequence[torch.Tensor] = ()
    ) -> None:
        """A step, measured here or from the norms a caller computed already (``StepNorms.add_step``)."""
        self._countdown -= 1
        if self._countdown:
            return
        self._countdown = self.settings.sample_every
        with self._lock:
            try:
                segment = self._segment_now()
                try:
                    segment.add_step(self._sampled_steps, self._completed(segment, precomputed))
                except DeviceMoved:  # the model moved: measure this step on its new device
                    segment.absorb()  # what it measured so far, while its device is there
                    segment = self._current = self._segment_for(self._read_seeds())
                    segment.add_step(self._sampled_steps, self._completed(segment, precomputed))
                if clip_factors:
                    self._clip_facts.add(clip_factors)
                self._sampled_steps += 1
                if segment.norms.waiting >= FLUSH_EVERY:
                    segment.absorb()
                self._follow_replaced_parameters()
            except Exception:  # noqa: BLE001 - telemetry must never stop training
                self._failed("observe_step")
            if self._ranks is not None:  # measured or not: every rank issues the same chunk all-reduces
                self._ranks.stepped(self._segments.values(), self._sampled_steps, self._current.home)

    def attach(self, optimizer: object | None = None) -> RemovableHandle:
        """Observe optimizer steps from a step post-hook; ``handle.remove()`` detaches.

        With an optimizer (or a wrapper of one): every step of that optimizer. With none: every step
        of any optimizer in the process that holds a parameter of the model, once per training step,
        so replacing the optimizer changes nothing (``optimizer_hooks.EveryOptimizer``).
        The step is measured before clipping: until :meth:`close`, ``torch.nn.utils.clip_grad_norm_``
        and ``clip_grad_value_`` on the model's parameters hand this step's norms over before they
        scale (``clipping``); a clip the package cannot reach is named in a warning here.
        """
        if not self._enabled:
            return RemovableHandle(OrderedDict())  # a handle whose remove() has nothing to do
        if any(_active(hook) for hook in self._hooks):
            raise RuntimeError(
                "attach() was already called on this SeedLayerTelemetry and its hook is still "
                "attached: a second one would measure every step twice; remove the first handle "
                "(handle.remove()) before attaching again"
            )
        self._attach_clip()
        if optimizer is None:
            handle = EveryOptimizer(self.model, self.observe_step).handle
        else:
            handle = OptimizerSteps(unwrap_optimizer(optimizer), self.observe_step).handle
        self._hooks.append(handle)
        self._warn_outside_model(self._current.modules)
        return handle

    def end_epoch(self) -> EpochSummary | None:
        """Reduce the epoch (one device-to-host copy), publish its top-K and return the summary."""
        if not self._enabled:
            return None
        with self._lock:
            summary = EpochSummary(self.epoch, self._sampled_steps, self.settings.top_k, {})
            try:
                summary = self._with_clip_facts(self._summarise())
                if self._instruments is not None:
                    self._instruments.publish(summary)
            except Exception:  # noqa: BLE001
                self._failed("end_epoch")
            self.epoch += 1
            self._sampled_steps = 0
            self._epoch_stages = dict(self._stages)  # the gone seeds had their last summary
            self._partial = set()
            self._clip_facts.reset()
            self._model_ids = None  # parameters grafted in this epoch take part in the next one's clips
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
        if self._clip_patch is not None:
            self._clip_patch.remove()  # type: ignore[attr-defined]
            self._clip_patch = None
        if self._instruments is not None:
            self._instruments.close()
        self._enabled = False

    def _attach_clip(self, *, deepspeed: bool = False) -> None:
        """Take the clips of the model's parameters until close (once, however often attached)."""
        if self._clip_patch is None:
            self._clip_patch = attach_clip_patch(self)
            warn_unreachable_clip(self.model, deepspeed=deepspeed)

    def _takes_clip(self, first_parameter: int) -> bool:
        """A clip of the model's parameters, before a sampled step (``clipping.ClipListener``)."""
        if not self._enabled or self._countdown != 1:
            return False
        if self._model_ids is None:
            self._model_ids = frozenset(id(param) for param in self.model.parameters())
        return first_parameter in self._model_ids

    def _stage_clip(self, norms: dict[int, torch.Tensor], factor: torch.Tensor) -> None:
        with self._lock:
            self._pre_clip.stage(norms, factor)

    def _clip_applied(self, factor: torch.Tensor | None, parameter: torch.Tensor | None) -> None:
        with self._lock:
            self._pre_clip.mark(parameter)  # first: the clip just changed the gradients' versions
            if factor is not None:
                self._pre_clip.stage(None, factor)

    def _measure_before_clip(self) -> None:
        """Take this step's norms now, before a clip runs (Lightning's ``on_before_optimizer_step``, a clip
        whose norms cannot be shared); the step that follows commits them. Only before a sampled step."""
        if not self._enabled or self._countdown != 1:
            return
        with self._lock:
            try:
                holders = self._current.norms.params
                present = [(id(holder), holder) for holder in holders if holder.grad is not None]
                norms, order = l2_norms([holder.grad for _, holder in present])  # type: ignore[misc]
                self._pre_clip.stage({present[i][0]: norm for i, norm in zip(order, norms)}, None)
                self._pre_clip.mark(present[0][1] if present else None)  # type: ignore[arg-type]
            except Exception:  # noqa: BLE001
                self._failed("measure before clip")

    def _completed(
        self, segment: Segment, norms: Mapping[int, torch.Tensor] | None
    ) -> Mapping[int, torch.Tensor] | None:
        """Norms taken before the clip, plus those of the segment's parameters no clip covered (still unclipped now)."""
        if norms is None:
            return None
        holders = segment.norms.params
        if self._ids_of is None or self._ids_of[0] is not segment:
            self._ids_of = (segment, [id(holder) for holder in holders])
        ids = self._ids_of[1]
        if all(map(norms.__contains__, ids)):
            return norms
        missing = [
            (key, holder.grad) for key, holder in zip(ids, holders) if key not in norms and holder.grad is not None
        ]
        if not missing:
            return norms
        measured, order = l2_norms([grad for _, grad in missing])  # type: ignore[misc]
        return {**norms, **{missing[i][0]: norm for i, norm in zip(order, measured)}}

    def _with_clip_facts(self, summary: EpochSummary) -> EpochSummary:
        if not self._clip_facts.steps:
            return summary
        clip_steps = self._clip_facts.steps
        clipped, smallest = self._clip_facts.take()  # a second small host copy, only in epochs that clipped
        return replace(summary, clip_steps=clip_steps, clipped_steps=clipped, min_clip_factor=smallest)

    def __enter__(self) -> SeedLayerTelemetry:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _segment_now(self) -> Segment:
        """The segment for the seeds the source lists now: one call of the source and an identity
        check of its modules; a walk over parameters only when a seed came, went or was swapped."""
        try:
            mapping = self._source() if callable(self._source) else self._source
            previous, self._last_mapping = self._last_mapping, mapping
            if self._current.lists_same_modules(mapping):
                return self._current
            views = validate_seeds(mapping, self._stage_names)
        except Exception:  # noqa: BLE001 - measure the seeds known last rather than nothing
            self._failed("seed source")
            return self._current
        self._note_gone(previous, views)
        self._current = self._segment_for(views)
        return self._current

    def _note_gone(self, previous: object, views: Mapping[str, SeedView]) -> None:
        """A seed the source no longer lists keeps the stage it had at the last sampled step it was
        listed at (a culled seed's CULLED, when the source gave a new mapping at each call)."""
        if not isinstance(previous, Mapping):
            return
        for seed_id in self._current.modules.keys() - views.keys():
            entry = previous.get(seed_id)
            if isinstance(entry, tuple) and len(entry) == 2:
                try:
                    self._epoch_stages[seed_id] = stage_name(seed_id, entry[1], self._stage_names)
                except TypeError:
                    pass  # keep the stage seen before

    def _follow_replaced_parameters(self) -> None:
        """A parameter replaced or added inside a seed module that stays the same object is not seen by
        the step path's module check. Each seed's parameters are walked once every PARAMETER_CHECK_EVERY
        sampled steps (a share of the seeds at each step, so no step pays for all) and at the epoch end;
        a seed whose parameters changed is measured on the new ones from the next step, its epoch flagged
        partial."""
        count = len(self._current.modules)
        share = -(-count // PARAMETER_CHECK_EVERY)  # seeds walked at a step that checks
        if not share:
            return
        groups = -(-count // share)
        stride = PARAMETER_CHECK_EVERY // groups  # sampled steps between two checks
        if self._sampled_steps % stride:
            return
        start = self._sampled_steps // stride % groups * share
        seeds = itertools.islice(self._current.modules, start, start + share)
        changed = _seeds_with_new_parameters(self._current, seeds)
        if changed:
            self._partial |= changed
            self._current = self._segment_for(self._read_seeds())

    def _segment_for(self, seeds: Mapping[str, SeedView]) -> Segment:
        for seed_id, view in seeds.items():
            self._epoch_stages[seed_id] = view.stage
        if any(_active(hook) for hook in self._hooks):
            self._warn_outside_model({seed_id: view.module for seed_id, view in seeds.items()})
        host = self._host_parameters(seeds) if self.settings.host_norm else ()
        key = segment_key(seeds, host)
        segment = self._segments.get(key)
        if segment is None:
            segment = self._segments[key] = Segment(
                seeds,
                key,
                host=host,
                keep_rows=self._ranks is not None,
                tensor_bounds=(self.settings.tensor_vanishing_below, self.settings.tensor_exploding_above),
            )
        return segment

    def _warn_outside_model(self, seeds: Mapping[str, nn.Module]) -> None:
        """Under attach(), say once per seed when its module is not inside ``model``: attach() follows the
        optimizers of the model's parameters, and a module outside the model's forward gets no gradient."""
        outside = [
            seed_id
            for seed_id, module in seeds.items()
            if seed_id not in self._warned_outside
            and not {id(p) for p in module_parameters(module)} <= self._model_parameters
        ]
        if not outside:
            return
        self._model_parameters = {id(p) for p in module_parameters(self.model)}  # the model may have grown
        for seed_id in outside:
            if not {id(p) for p in module_parameters(seeds[seed_id])} <= self._model_parameters:
                self._warned_outside.add(seed_id)
                _logger.warning(
                    "tolaria_otel: seed %r is not inside the model given to SeedLayerTelemetry (its "
                    "parameters are not among model.parameters()): attach() does not follow its "
                    "optimizer and it is measured only when its gradients are set at an observed step; "
                    "pass the model that contains the seeds",
                    seed_id,
                )

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
            self._partial |= _seeds_with_new_parameters(self._current, self._current.modules)  # since the last check
            seeds_now = self._read_seeds()
            self._note_gone(self._last_mapping, seeds_now)
            self._stages = {seed_id: view.stage for seed_id, view in seeds_now.items()}
            # Parameters frozen or unfrozen in place are seen here too (the step path checks modules only).
            self._current = self._segment_for(seeds_now)
        except Exception:  # noqa: BLE001 - keep the last known seeds and stages
            self._failed("seed source")
        # Every seed listed at some sampled step, the gone ones included (with their last stage).
        stages: Mapping[str, str] = dict(sorted(self._epoch_stages.items()))
        segments = list(self._segments.values())
        home = self._current.home
        sums: EpochSums | None = None
        left = stages.keys() - self._stages.keys()
        if self._ranks is not None:  # on every rank at every epoch end: the others wait in the all-reduce
            sums, stages, left = self._ranks.reduce(segments, steps, stages, self._stages.keys(), home)
            steps = sums.steps
        elif steps:
            sums = fold(segments, home, steps)  # the epoch's one host sync
        if not steps and stages:
            _logger.log(
                logging.DEBUG if self._warned_unsampled else logging.WARNING,
                "tolaria_otel: epoch %d had no sampled step (sample_every=%d); nothing to report",
                self.epoch,
                self.settings.sample_every,
            )
            self._warned_unsampled = True
        if sums is None or not steps:
            return EpochSummary(self.epoch, steps, self.settings.top_k, {})
        by_seed = _slot_values(sums)
        host = by_seed.get(HOST, {}).get(TOTAL)
        host_norm = host.rms if host is not None else None
        return EpochSummary(
            self.epoch, steps, self.settings.top_k, self._seed_summaries(sums, by_seed, stages, left, host), host_norm
        )

    def _seed_summaries(
        self,
        sums: EpochSums,
        by_seed: Mapping[str, dict[str, _SlotValues]],
        stages: Mapping[str, str],
        left: Collection[str],
        host: _SlotValues | None,
    ) -> dict[str, SeedSummary]:
        """Every seed listed at some sampled step of the epoch, the ones gone before its end included."""
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
                seed_id=seed_id,
                stage=stage,
                total_norm=total_norm,
                top_layers=top_k({k: v for k, v in layers.items() if v is not None}, self.settings.top_k)
                if measured
                else (),
                layer_count=len(slots),
                sampled_steps=sums.seed_steps[seed_id],
                max_norm=max_norm,
                layer_norms=layers,
                layer_max=layer_max,
                nonfinite_steps=nonfinite_steps,
                step_norm_counts=sums.counts.get(seed_id, ()) if measured else (),
                host_ratio=ratio,
                health=classify(total_norm, max_norm, layers.values(), nonfinite_steps),
                left=seed_id in left,
                partial=seed_id in self._partial,
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
        _logger.log(
            logging.WARNING if first else logging.DEBUG,
            "tolaria_otel: %s failed; training goes on without this measurement",
            where,
            exc_info=first,
        )


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
            math.sqrt(sums.maxima[i]) if measured else None,
            sums.nonfinite[i],
            sums.numel[i],
            sums.tensors[i] if sums.tensors else None,
            sums.vanishing[i] if sums.vanishing is not None else None,
            sums.exploding[i] if sums.exploding is not None else None,
        )
    return out


def _active(handle: RemovableHandle) -> bool:
    """Whether a hook handle is still registered (``remove()`` takes its id out of the hooks dict)."""
    hooks = handle.hooks_dict_ref()
    return hooks is not None and handle.id in hooks


def _seeds_with_new_parameters(segment: Segment, seed_ids: Iterable[str]) -> set[str]:
    """Those of ``seed_ids`` whose modules now hold a trainable parameter ``segment`` does not measure."""
    measured = segment.measured_parameters
    return {
        seed_id
        for seed_id in seed_ids
        if any(p.requires_grad and id(p) not in measured for p in module_parameters(segment.modules[seed_id]))
    }


def _checked_identity(attributes: Mapping[str, str] | None) -> dict[str, str]:
    if attributes is None:
        return {}
    if not isinstance(attributes, Mapping):
        raise TypeError(
            f"attributes is {type(attributes).__name__}: expected a mapping str -> str, for example {{'env_id': '3'}}"
        )
    for key, value in attributes.items():
        if not isinstance(key, str) or not key or not isinstance(value, str):
            raise TypeError(f"attributes[{key!r}] = {value!r}: expected non-empty str keys and str values")
        if key in RESERVED_ATTRIBUTES:
            raise ValueError(
                f"attributes[{key!r}]: {key!r} is one of the package's own attributes "
                f"({', '.join(sorted(RESERVED_ATTRIBUTES))}); name the trainer with another key, "
                "for example env_id"
            )
    return dict(attributes)
