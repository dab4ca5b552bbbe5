"""The epoch's clip facts, a statistic of the step path: how many sampled steps a clip scaled, its smallest factor."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ClipTotals:
    """An epoch's clip facts on the host (``EpochSummary.clip_steps``, ``clipped_steps``, ``min_clip_factor``)."""

    steps: int = 0  # sampled steps at which a clip was seen
    clipped: int = 0  # of those, the steps it scaled down
    smallest: float | None = None  # the smallest factor; None when no clip was seen


class ClipFacts:
    """Per epoch, on the device: how many sampled steps the clip scaled down, and its smallest factor.

    A step's factor is the clip's ``min(max_norm / (total + 1e-6), 1)`` (the smallest of its clips when
    it clipped several groups). Factors wait as 0-d tensors and are folded every ``FLUSH_EVERY`` steps in
    one batch of ops: nothing on the step path but an append. :meth:`take` is a host copy of two floats,
    made only in epochs in which a clip was seen (the epoch's statistics copy is another module's).
    """

    def __init__(self, flush_every: int) -> None:
        self.steps = 0  # sampled steps at which a clip was seen
        self._flush_every = flush_every
        self._waiting: list[torch.Tensor] = []
        self._totals: torch.Tensor | None = None  # [clipped steps, smallest factor]

    def add(self, factors: Sequence[torch.Tensor]) -> None:
        factor = (
            factors[0]
            if len(factors) == 1
            else torch.stack([f.to(factors[0].device, torch.float32) for f in factors]).amin()
        )
        self._waiting.append(factor)
        self.steps += 1
        if len(self._waiting) >= self._flush_every:
            self._fold()

    @torch.no_grad()
    def _fold(self) -> None:
        if not self._waiting:
            return
        device = self._waiting[0].device if self._totals is None else self._totals.device
        factors = torch.stack([f.to(device, torch.float32) for f in self._waiting])
        self._waiting = []
        batch = torch.stack([(factors < 1).sum(dtype=torch.float32), factors.amin()])
        if self._totals is None:
            self._totals = batch
        else:
            self._totals = torch.stack([self._totals[0] + batch[0], torch.minimum(self._totals[1], batch[1])])

    def take(self) -> ClipTotals:
        """The epoch's facts on the host; then starts over."""
        if not self.steps:
            return ClipTotals()
        self._fold()
        assert self._totals is not None
        clipped, smallest = self._totals.tolist()  # the one host copy of the clip facts, per epoch that clipped
        totals = ClipTotals(self.steps, int(clipped), smallest)
        self.reset()
        return totals

    def reset(self) -> None:
        self.steps = 0
        self._waiting = []
        self._totals = None
