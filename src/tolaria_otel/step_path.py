"""The step path and the epoch's fold: sampled steps queued on the device, reduced once at the epoch end.

At a sampled step the seeds listed now are measured (``SeedTracker.segment_now``) with the norms a
clip took before it scaled, completed for the parameters it did not cover (``pre_clip``), or with
one foreach norm: device work only, no host sync (docs/contracts.md). Every ``FLUSH_EVERY`` steps the
waiting norms are folded into the segment's running statistics. At the epoch end the segments are
folded into the epoch's sums: one device-to-host copy, or under torch.distributed the ranks'
all-reduce (``distributed.RankReduction``), in which every rank takes part at every sampled step
and every epoch end.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection, Mapping, Sequence

import torch

from .capture.sampling import Sampling
from .capture.staged_step import StagedClip
from .failures import FailureLog
from .measure.clip_facts import ClipFacts
from .measure.seed_tracker import SeedTracker
from .measure.step_norms import FLUSH_EVERY, DeviceMoved
from .reduce.fold import EpochSums, fold
from .reduce.ranks import RankReduction

_logger = logging.getLogger("tolaria_otel.telemetry")  # the telemetry's warnings, under the name users filter on

#: The epoch as the summary reads it: its sums, every seed listed at some sampled step with its last
#: stage, the seeds gone before its end, and the optimizer step number of a sampled step's index.
FoldedEpoch = tuple[EpochSums, Mapping[str, str], Collection[str], Callable[[int], int | None]]


class StepNumbers:
    """The optimizer step number of each sampled step of the epoch, by its sampled index: a rule while
    the numbers go up by ``sample_every`` (no list per step), a list once a caller's numbering departs
    from it (``observe_step(step=N)``)."""

    def __init__(self, every: int) -> None:
        self._every = every
        self.start_epoch()

    def start_epoch(self) -> None:
        self._first: int | None = None
        self._count = 0
        self._listed: list[int] | None = None

    def add(self, number: int) -> None:
        if self._listed is not None:
            self._listed.append(number)
        elif self._first is None:
            self._first = number
        elif number != self._first + self._count * self._every:
            self._listed = [self._first + i * self._every for i in range(self._count)] + [number]
        self._count += 1

    def __call__(self, index: int) -> int | None:
        """The step number of the ``index``-th sampled step, or None when there is none."""
        if self._first is None or not 0 <= index < self._count:
            return None
        return self._listed[index] if self._listed is not None else self._first + index * self._every


class StepPath:
    """One telemetry's sampled steps of the current epoch, and their fold at its end.

    ``lock`` is the telemetry's: a step takes it only once it is known to be sampled.
    """

    def __init__(
        self,
        sampling: Sampling,
        seeds: SeedTracker,
        ranks: RankReduction | None,
        lock: threading.Lock,
        failures: FailureLog,
    ) -> None:
        self._sampling = sampling
        self._seeds = seeds
        #: The epoch's clip facts: the committed steps' factors.
        self.clip_facts = ClipFacts(FLUSH_EVERY)
        self._ranks = ranks
        self._lock = lock
        self._failures = failures
        self.sampled_steps = 0  # of this epoch
        #: The next optimizer step's number: every observed step counts, sampled or not, from 0 at the first.
        self._next_number = 0
        self._numbers = StepNumbers(sampling.every)
        self._warned_unsampled = False
        if ranks is not None:  # on every rank: which slots the sharded steps' chunks carry
            ranks.begin(seeds.current)

    def observe(
        self,
        staged: Mapping[int, torch.Tensor] | None,
        clip_factors: Sequence[StagedClip] = (),
        step: int | None = None,
    ) -> None:
        """A step, measured here or from the norms a clip took before it scaled (``Segment.add_step``);
        ``step``: its number, when the caller counts them (else the one after the last)."""
        number = self._next_number if step is None else step
        self._next_number = number + 1
        if not self._sampling.count():
            return
        seeds = self._seeds
        with self._lock:
            try:
                segment = seeds.segment_now()
                try:
                    segment.add_step(self.sampled_steps, staged)
                except DeviceMoved:  # the model moved: measure this step on its new device
                    segment.absorb()  # what it measured so far, while its device is there
                    segment = seeds.reread()
                    segment.add_step(self.sampled_steps, staged)
                if clip_factors:  # each clip to its owner: a seed (its own parameters only) or the trainer
                    self.clip_facts.add(clip_factors, segment.clip_owner)
                self._numbers.add(number)  # a host list at most: the index is mapped at the epoch end
                self.sampled_steps += 1
                seeds.follow_replaced_parameters(self.sampled_steps)
            except Exception:  # noqa: BLE001 - telemetry must never stop training
                self._failures("observe_step")
            if self._ranks is not None:  # measured or not: every rank issues the same chunk all-reduces
                self._ranks.stepped(seeds.segments.values(), self.sampled_steps, seeds.current.home)

    def fold(self, epoch: int) -> FoldedEpoch | None:
        """The epoch's sums (the epoch's one host sync; under torch.distributed, on every rank, the
        all-reduce the others wait in); None when no step was sampled, on any rank."""
        seeds = self._seeds
        steps = self.sampled_steps
        # Every seed listed at some sampled step, the gone ones included (with their last stage).
        stages: Mapping[str, str] = dict(sorted(seeds.epoch_stages.items()))
        segments = list(seeds.segments.values())
        home = seeds.current.home
        sums: EpochSums | None = None
        left: Collection[str] = stages.keys() - seeds.stages.keys()
        clips = self.clip_facts.take()
        if self._ranks is not None:
            sums, stages, left = self._ranks.reduce(segments, steps, stages, seeds.stages.keys(), home, clips)
            steps = sums.steps
        elif steps:
            sums = fold(segments, home, steps, clips)
        if not steps and stages:
            _logger.log(
                logging.DEBUG if self._warned_unsampled else logging.WARNING,
                "tolaria_otel: epoch %d had no sampled step (sample_every=%d); nothing to report",
                epoch,
                self._sampling.every,
            )
            self._warned_unsampled = True
        if sums is None or not steps:
            return None
        return sums, stages, left, self._numbers

    def start_epoch(self) -> None:
        self.sampled_steps = 0
        self._numbers.start_epoch()
        self.clip_facts.reset()
