"""Which seeds are measured: the seed source read at each sampled step, and the segments it gives.

Seeds come and go at any optimizer step (docs/contracts.md). The source is read at every sampled step (one
call, then an identity check of the seed modules); a seed that came, went or was swapped starts a
new segment (``epoch.Segment``). Over an epoch the tracker keeps what the summary needs about the
seeds besides their values: every seed listed at some sampled step with its last stage (a seed
culled mid-epoch keeps its place), the seeds listed now, and the seeds whose parameters were
replaced in place (their values are partial).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence

from torch import nn

from ..config.settings import SeedLayerSettings
from ..failures import FailureLog
from .local_gradients import GradientHolder
from .seeds import SeedSource, SeedView, StageNames, read_seeds, stage_name, validate_seeds
from .segment import Segment, SegmentKey, module_parameters, segment_key

_logger = logging.getLogger("tolaria_otel.telemetry")  # the telemetry's warnings, under the name users filter on

#: Sampled steps between two walks over the seeds' parameters that find a parameter replaced or added
#: inside a seed module (a walk per step would cost more than the step's measurement; docs/benchmarks.md).
PARAMETER_CHECK_EVERY = 64


class SeedTracker:
    """The seed source of one telemetry, its segments, and the epoch's stages.

    Not locked: the telemetry calls it under its lock. ``attached`` says whether the telemetry follows
    optimizer steps from hooks (``attach()``), under which a seed outside the model is worth a warning.
    """

    def __init__(
        self,
        model: nn.Module,
        source: SeedSource,
        stage_names: StageNames | None,
        settings: SeedLayerSettings,
        *,
        keep_rows: bool,
        failures: FailureLog,
        attached: Callable[[], bool],
    ) -> None:
        self._model = model
        self._source = source
        self._stage_names = stage_names
        self._host_norm = settings.host_norm
        self._tensor_bounds = (settings.tensor_vanishing_below, settings.tensor_exploding_above)
        self._keep_rows = keep_rows  # under torch.distributed: which slots the sharded steps' chunks carry
        self._failures = failures
        self._attached = attached
        seeds_now = read_seeds(source, stage_names)  # fail fast on a malformed source
        #: The seeds the source listed at the last read, with their stages.
        self.stages = {seed_id: view.stage for seed_id, view in seeds_now.items()}
        #: Every seed listed at some point of this epoch, with the last stage seen: a seed culled
        #: mid-epoch keeps its place in the epoch's summary.
        self.epoch_stages = dict(self.stages)
        #: Seeds with parameters replaced or added in place this epoch.
        self.partial: set[str] = set()
        self._last_mapping: object = None  # what the source returned at the last sampled step
        self._model_parameters: set[int] = set()
        self._warned_outside: set[str] = set()
        self.segments: dict[SegmentKey, Segment] = {}
        self.current = self._segment_for(seeds_now)

    def segment_now(self) -> Segment:
        """The segment for the seeds the source lists now: one call of the source and an identity
        check of its modules; a walk over parameters only when a seed came, went or was swapped."""
        try:
            mapping = self._source() if callable(self._source) else self._source
            previous, self._last_mapping = self._last_mapping, mapping
            if self.current.lists_same_modules(mapping):
                return self.current
            views = validate_seeds(mapping, self._stage_names)
        except Exception:  # noqa: BLE001 - measure the seeds known last rather than nothing
            self._failures("seed source")
            return self.current
        self._note_gone(previous, views)
        self.current = self._segment_for(views)
        return self.current

    def measured_parameters(self) -> Sequence[GradientHolder]:
        """The parameters a step measures now (those of the current segment's seeds)."""
        return self.current.norms.params

    def reread(self) -> Segment:
        """A new segment for the seeds listed now, their parameters walked again (the model moved)."""
        self.current = self._segment_for(read_seeds(self._source, self._stage_names))
        return self.current

    def follow_replaced_parameters(self, sampled_steps: int) -> None:
        """A parameter replaced or added inside a seed module that stays the same object is not seen by
        the step path's module check. Each seed's parameters are walked once every PARAMETER_CHECK_EVERY
        sampled steps (a share of the seeds at each step, so no step pays for all) and at the epoch end;
        a seed whose parameters changed is measured on the new ones from the next step, its epoch flagged
        partial."""
        count = len(self.current.modules)
        share = -(-count // PARAMETER_CHECK_EVERY)  # seeds walked at a step that checks
        if not share:
            return
        groups = -(-count // share)
        stride = PARAMETER_CHECK_EVERY // groups  # sampled steps between two checks
        if sampled_steps % stride:
            return
        start = sampled_steps // stride % groups * share
        seeds = itertools.islice(self.current.modules, start, start + share)
        changed = seeds_with_new_parameters(self.current, seeds)
        if changed:
            self.partial |= changed
            self.reread()

    def settle(self) -> None:
        """The epoch end's look at the seeds: parameters replaced since the last check, the seeds and
        stages listed now; parameters frozen or unfrozen in place are seen here too (the step path
        checks modules only). A failing source keeps the last known seeds and stages."""
        try:
            self.partial |= seeds_with_new_parameters(self.current, self.current.modules)  # since the last check
            seeds_now = read_seeds(self._source, self._stage_names)
            self._note_gone(self._last_mapping, seeds_now)
            self.stages = {seed_id: view.stage for seed_id, view in seeds_now.items()}
            self.current = self._segment_for(seeds_now)
        except Exception:  # noqa: BLE001 - keep the last known seeds and stages
            self._failures("seed source")

    def start_epoch(self) -> None:
        """The gone seeds had their last summary; the current segment is the only one carried over."""
        self.epoch_stages = dict(self.stages)
        self.partial = set()
        for segment in self.segments.values():
            segment.reset()
        self.segments = {self.current.key: self.current}

    def warn_outside_model(self, seeds: Mapping[str, nn.Module]) -> None:
        """Under attach(), say once per seed when its module is not inside the model: attach() follows the
        optimizers of the model's parameters, and a module outside the model's forward gets no gradient."""
        outside = [
            seed_id
            for seed_id, module in seeds.items()
            if seed_id not in self._warned_outside
            and not {id(p) for p in module_parameters(module)} <= self._model_parameters
        ]
        if not outside:
            return
        self._model_parameters = {id(p) for p in module_parameters(self._model)}  # the model may have grown
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

    def _note_gone(self, previous: object, views: Mapping[str, SeedView]) -> None:
        """A seed the source no longer lists keeps the stage it had at the last sampled step it was
        listed at (a culled seed's CULLED, when the source gave a new mapping at each call)."""
        if not isinstance(previous, Mapping):
            return
        for seed_id in self.current.modules.keys() - views.keys():
            entry = previous.get(seed_id)
            if isinstance(entry, tuple) and len(entry) == 2:
                with contextlib.suppress(TypeError):  # an unnamed stage: keep the stage seen before
                    self.epoch_stages[seed_id] = stage_name(seed_id, entry[1], self._stage_names)

    def _segment_for(self, seeds: Mapping[str, SeedView]) -> Segment:
        for seed_id, view in seeds.items():
            self.epoch_stages[seed_id] = view.stage
        if self._attached():
            self.warn_outside_model({seed_id: view.module for seed_id, view in seeds.items()})
        host = self._host_parameters(seeds) if self._host_norm else ()
        key = segment_key(seeds, host)
        segment = self.segments.get(key)
        if segment is None:
            segment = self.segments[key] = Segment(
                seeds, key, host=host, keep_rows=self._keep_rows, tensor_bounds=self._tensor_bounds
            )
        return segment

    def _host_parameters(self, seeds: Mapping[str, SeedView]) -> list[nn.Parameter]:
        """Every trainable parameter of the model that belongs to no seed (walked only when a seed
        came, went or was swapped, and at epoch ends)."""
        in_seeds = {id(p) for view in seeds.values() for p in module_parameters(view.module)}
        return [p for p in module_parameters(self._model) if p.requires_grad and id(p) not in in_seeds]


def seeds_with_new_parameters(segment: Segment, seed_ids: Iterable[str]) -> set[str]:
    """Those of ``seed_ids`` whose modules now hold a trainable parameter ``segment`` does not measure."""
    measured = segment.measured_parameters
    return {
        seed_id
        for seed_id in seed_ids
        if any(p.requires_grad and id(p) not in measured for p in module_parameters(segment.modules[seed_id]))
    }
