"""A single process's epoch end: the segments' statistics in one vector, copied to the host once.

Also the host's side of every epoch end (``ranks`` under torch.distributed): what the host knows of the
slots without reading the device (:class:`HostFacts`), and the vector read back into :class:`EpochSums`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..measure.clip_facts import ClipTotals
from ..measure.segment import LAST_STEP_ROWS, TOTAL, Segment, Slot
from ..measure.statistics import BUCKETS, COLUMNS, StatisticsLayout


@dataclass(frozen=True)
class EpochSums:
    """The epoch as the summary needs it, per slot (in ``slots`` order)."""

    slots: tuple[Slot, ...]
    sums: Sequence[float]  # sum over the steps of the squared norm
    maxima: Sequence[float]  # the largest per-step squared norm
    nonfinite: Sequence[int]  # steps whose norm was NaN or Inf
    measured: Sequence[bool]  # some parameter of it had a gradient at some step
    numel: Sequence[int]  # elements of the parameters that had a gradient
    counts: Mapping[str, tuple[int, ...]]  # per seed: its per-step norms per histogram bucket
    seed_steps: Mapping[str, int]  # per seed: the sampled steps at which it was listed
    steps: int
    tensors: Sequence[int] = ()  # gradient tensors that had a gradient (empty: not known)
    #: Tensor-steps below the lower health bound (None: not counted; a slot's None: not known for it, a
    #: sharded gradient's under torch.distributed).
    vanishing: Sequence[int | None] | None = None
    exploding: Sequence[int | None] | None = None  # tensor-steps above the upper one, or non-finite
    #: The trainer's clip facts, and per seed those of its own clips (``clips.seeds``): each rank's own under
    #: torch.distributed (every rank clips alike; the factors are not reduced).
    clips: ClipTotals = field(default_factory=ClipTotals)
    #: The epoch's sampled index of the largest per-step square (the first on ties, non-finite first).
    max_steps: Sequence[float] = ()
    #: Per slot, of the last sampled step it was measured at: ``LAST_STEP_ROWS`` rows of ``slots`` values (the
    #: squared norm, the tensors that had a gradient, those below and above the health bounds); empty: not
    #: known (under torch.distributed).
    last_step: Sequence[float] = ()


@dataclass(frozen=True)
class HostFacts:
    """What the host knows of an epoch's slots without reading the device: presence and sizes."""

    slots: tuple[Slot, ...]
    measured: tuple[bool, ...]
    numel: tuple[int, ...]
    seed_steps: Mapping[str, int]
    tensors: tuple[int, ...] = ()  # parameters that had a gradient (empty: not known)


def host_facts(segments: Sequence[Segment]) -> HostFacts:
    active = [segment for segment in segments if segment.steps]
    if len(active) == 1 and active[0].norms.steps_all_present:  # the usual epoch: every parameter had a gradient
        segment = active[0]
        return HostFacts(
            tuple(segment.slots),
            tuple(bool(params) for params in segment.slot_params),
            tuple(segment.slot_numel),
            dict.fromkeys(sorted(segment.seed_ids), segment.steps),
            tuple(len(params) for params in segment.slot_params),
        )
    seed_steps: dict[str, int] = {}
    measured: dict[Slot, bool] = {}
    numel: dict[Slot, int] = {}
    tensors: dict[Slot, int] = {}
    for segment in active:
        for seed_id in segment.seed_ids:
            seed_steps[seed_id] = seed_steps.get(seed_id, 0) + segment.steps
        had = segment.norms.had_gradient()
        for slot, params in zip(segment.slots, segment.slot_params):
            measured[slot] = measured.get(slot, False) or any(had[i] for i in params)
            numel[slot] = max(numel.get(slot, 0), sum(segment.numel[i] for i in params if had[i]))
            tensors[slot] = max(tensors.get(slot, 0), sum(had[i] for i in params))
    slots = tuple(sorted(measured))
    return HostFacts(
        slots,
        tuple(measured[s] for s in slots),
        tuple(numel[s] for s in slots),
        seed_steps,
        tuple(tensors[s] for s in slots),
    )


def epoch_sums(facts: HostFacts, values: Sequence[float], steps: int, clips: ClipTotals) -> EpochSums:
    """The epoch from its statistics vector (``StatisticsLayout``, in ``facts.slots`` order), copied to the
    host; the health counts are None when the vector stops before them (a NaN count: not known)."""
    n = len(facts.slots)
    layout = StatisticsLayout(n)
    parts = layout.host(values)
    counts = parts["counts"]
    tensors = parts["tensors"]
    counted = len(values) >= layout.length
    return EpochSums(
        facts.slots,
        parts["sums"],
        parts["maxima"],
        [int(counts[i * COLUMNS + BUCKETS]) for i in range(n)],
        facts.measured,
        facts.numel,
        {
            seed: tuple(int(c) for c in counts[i * COLUMNS : i * COLUMNS + BUCKETS])
            for i, (seed, layer) in enumerate(facts.slots)
            if layer == TOTAL
        },
        facts.seed_steps,
        steps,
        facts.tensors,
        _counts(tensors[:n]) if counted else None,
        _counts(tensors[n:]) if counted else None,
        clips,
        parts["max_steps"],
    )


def _counts(values: Sequence[float]) -> list[int | None]:
    """Counts as integers; NaN marks a count not known (``distributed``: a sharded gradient's)."""
    return [None if math.isnan(value) else int(value) for value in values]


@torch.no_grad()
def fold(segments: Sequence[Segment], home: torch.device, steps: int, clips: ClipTotals) -> EpochSums:
    """A single process's epoch: the segments' statistics in one vector, copied to the host once."""
    for segment in segments:
        segment.absorb()
    facts = host_facts(segments)
    statistics = fold_statistics(segments, facts, home)
    values = torch.cat([statistics, last_steps(segments, facts, home).flatten()]).tolist()  # the one host sync
    length = len(statistics)
    return dataclasses.replace(epoch_sums(facts, values[:length], steps, clips), last_step=values[length:])


def last_steps(segments: Sequence[Segment], facts: HostFacts, home: torch.device) -> torch.Tensor:
    """``[LAST_STEP_ROWS, slots]`` (``facts.slots`` order): each slot's values at the last sampled step of the
    epoch that measured it (``Segment.last_step``), the segments placed in the order of their last steps."""
    active = sorted((segment for segment in segments if segment.steps), key=lambda segment: segment.last_index)
    if len(active) == 1 and tuple(active[0].slots) == facts.slots:
        return active[0].last_step()
    index = {slot: i for i, slot in enumerate(facts.slots)}
    last = torch.zeros(LAST_STEP_ROWS, len(facts.slots), dtype=torch.float32, device=home)
    for segment in active:
        target = torch.tensor([index[slot] for slot in segment.slots], dtype=torch.long, device=home)
        last.index_copy_(1, target, segment.last_step().to(home))
    return last


def fold_statistics(segments: Sequence[Segment], facts: HostFacts, home: torch.device) -> torch.Tensor:
    """The absorbed segments' statistics in one vector (``StatisticsLayout``, in ``facts.slots`` order),
    each part combined across segments by its own rule."""
    active = [segment for segment in segments if segment.steps]
    if len(active) == 1 and tuple(active[0].slots) == facts.slots:  # one segment: its vector as it is
        return active[0].stats.values
    layout = StatisticsLayout(len(facts.slots))
    index = {slot: i for i, slot in enumerate(facts.slots)}
    vector = layout.blank(home)
    parts = layout.views(vector)
    for segment in active:
        target = torch.tensor([index[slot] for slot in segment.slots], dtype=torch.long, device=home)
        layout.gather(parts, segment.stats.parts, target)
    return vector
