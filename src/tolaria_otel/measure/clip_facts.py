"""The epoch's clip facts, a statistic of the step path: how many sampled steps a clip scaled, its smallest factor.

Per owner: a clip whose parameters (those that had a gradient) all belong to one seed is that seed's
(``SeedSummary.clip_steps``, ``clipped_steps``, ``min_clip_factor``); every other clip (the host's, one over
several seeds, a global clip over the whole model, one whose parameters are not known) is the trainer's
(``EpochSummary.clip_steps`` ...). Esper clips the host and then each seed on its own: the trainer's facts
are then the host's clip alone, and each seed's are its own clip's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..capture.staged_step import StagedClip


@dataclass(frozen=True)
class ClipTotals:
    """An epoch's clip facts on the host (``EpochSummary.clip_steps``, ``clipped_steps``, ``min_clip_factor``)."""

    steps: int = 0  # sampled steps at which a clip was seen
    clipped: int = 0  # of those, the steps it scaled down
    smallest: float | None = None  # the smallest factor; None when no clip was seen
    #: Per seed, the facts of the clips of its own parameters only (a seed without one is absent).
    seeds: Mapping[str, ClipTotals] = field(default_factory=dict)


class _OwnerFacts:
    """One owner's (the trainer's, or a seed's) factors on the device: waiting, then folded in batches."""

    def __init__(self) -> None:
        self.steps = 0
        self.waiting: list[torch.Tensor] = []
        self.totals: torch.Tensor | None = None  # [clipped steps, smallest factor]

    def add(self, factors: Sequence[torch.Tensor]) -> None:
        factor = (
            factors[0]
            if len(factors) == 1
            else torch.stack([f.to(factors[0].device, torch.float32) for f in factors]).amin()
        )
        self.waiting.append(factor)
        self.steps += 1

    @torch.no_grad()
    def fold(self) -> None:
        if not self.waiting:
            return
        device = self.waiting[0].device if self.totals is None else self.totals.device
        factors = torch.stack([f.to(device, torch.float32) for f in self.waiting])
        self.waiting = []
        batch = torch.stack([(factors < 1).sum(dtype=torch.float32), factors.amin()])
        if self.totals is None:
            self.totals = batch
        else:
            self.totals = torch.stack([self.totals[0] + batch[0], torch.minimum(self.totals[1], batch[1])])


class ClipFacts:
    """Per epoch, on the device: per owner, how many sampled steps its clips scaled down, and their smallest factor.

    A step's factor is the clip's ``min(max_norm / (total + 1e-6), 1)`` (the smallest of the owner's clips
    when it clipped several groups). Factors wait as 0-d tensors and are folded every ``FLUSH_EVERY`` steps
    in one batch of ops: nothing on the step path but an append per clip and, per clip, a lookup of its
    owner (``Segment.clip_owner``, cached per parameter set). :meth:`take` is a host copy of two floats per
    owner, made only in epochs in which a clip was seen (the epoch's statistics copy is another module's).
    """

    def __init__(self, flush_every: int) -> None:
        self._flush_every = flush_every
        self._trainer = _OwnerFacts()
        self._seeds: dict[str, _OwnerFacts] = {}

    @property
    def steps(self) -> int:
        """Sampled steps at which a trainer-level clip was seen."""
        return self._trainer.steps

    def add(
        self,
        clips: Sequence[StagedClip | torch.Tensor],
        owner_of: Callable[[Mapping[int, torch.Tensor] | None], str | None] | None = None,
    ) -> None:
        """A committed step's clips, each given to its owner (``owner_of`` of its parameters: a seed id, or
        None for the trainer; without it every clip is the trainer's)."""
        if len(clips) == 1 and owner_of is None:  # the usual trainer-level clip: one factor, one append
            only = clips[0]
            self._add(self._trainer, [only if isinstance(only, torch.Tensor) else only[0]])
            return
        by_owner: dict[str | None, list[torch.Tensor]] = {}
        for clip in clips:
            factor, parameters = (clip, None) if isinstance(clip, torch.Tensor) else clip
            owner = None if owner_of is None else owner_of(parameters)
            by_owner.setdefault(owner, []).append(factor)
        for owner, factors in by_owner.items():
            if owner is None:
                self._add(self._trainer, factors)
            else:
                facts = self._seeds.get(owner)
                if facts is None:
                    facts = self._seeds[owner] = _OwnerFacts()
                self._add(facts, factors)

    def _add(self, facts: _OwnerFacts, factors: Sequence[torch.Tensor]) -> None:
        facts.add(factors)
        if len(facts.waiting) >= self._flush_every:
            facts.fold()

    def take(self) -> ClipTotals:
        """The epoch's facts on the host (one copy for all owners); then starts over."""
        owners: list[tuple[str | None, _OwnerFacts]] = [(None, self._trainer)] if self._trainer.steps else []
        owners.extend((seed_id, facts) for seed_id, facts in sorted(self._seeds.items()) if facts.steps)
        if not owners:
            return ClipTotals()
        for _, facts in owners:
            facts.fold()
        device = owners[0][1].totals.device  # type: ignore[union-attr]  # folded: steps > 0
        vector = torch.cat([facts.totals.to(device) for _, facts in owners])  # type: ignore[union-attr]
        values = vector.tolist()  # the one host copy of the clip facts, per epoch that clipped
        totals = {
            owner: ClipTotals(facts.steps, int(values[2 * i]), values[2 * i + 1])
            for i, (owner, facts) in enumerate(owners)
        }
        trainer = totals.pop(None, ClipTotals())
        self.reset()
        return ClipTotals(
            trainer.steps,
            trainer.clipped,
            trainer.smallest,
            {seed_id: value for seed_id, value in totals.items() if seed_id is not None},
        )

    def reset(self) -> None:
        self._trainer = _OwnerFacts()
        self._seeds = {}
