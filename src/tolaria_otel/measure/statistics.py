"""The per-slot statistics vector: its parts, where each lies in the flat vector, and how parts combine.

One flat float32 vector holds every slot's statistics, part after part (``PARTS``), so an epoch end
copies or all-reduces it as it is. Each part says how two segments' values of a slot combine and whether
it comes from the per-step squares (then a sharded slot's is recomputed from the ranks' summed squares)
or from per-tensor counts (not known for a shard: a shard's norm is not its tensor's). Across ranks a
replicated slot's values are each rank's own, so every part is the holders' mean; a count's is rounded.
A new per-slot statistic is one entry of ``PARTS`` and its computation in :func:`slot_statistics`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from ..config.histogram import HISTOGRAM_BOUNDARIES
from .step_norms import TENSOR_COUNTS

BUCKETS = len(HISTOGRAM_BOUNDARIES) + 1
#: Per slot, one count per histogram bucket and a last one for the non-finite steps.
COLUMNS = BUCKETS + 1

#: How two segments' values of a slot combine: added, the larger kept, or the step index of the larger
#: ``maxima`` kept (the earlier one on ties; a non-finite square ranks above every finite one).
Combine = Literal["sum", "max", "first_at_max"]
#: What each combine starts from in a fold: a value that any segment's replaces or adds nothing to.
IDENTITY: Mapping[Combine, float] = {"sum": 0.0, "max": 0.0, "first_at_max": math.inf}
#: The batch's largest keyed square (:func:`max_keys`) that :func:`slot_statistics` hands to
#: :meth:`StatisticsLayout.add` alongside the parts, so the combine does not key the batch's maxima again.
MAX_KEYS = "max_keys"


@dataclass(frozen=True)
class Part:
    """One per-slot statistic: ``width`` values per slot, laid out ``[slots, width]`` (``slot_axis`` 0) or
    ``[width, slots]`` (``slot_axis`` 1)."""

    name: str
    width: int
    slot_axis: int
    segments: Combine
    from_rows: bool  # computed from per-step squares (else counted per gradient tensor)
    count: bool  # an integer count: the ranks' mean is rounded


PARTS: tuple[Part, ...] = (
    Part("sums", 1, 0, "sum", from_rows=True, count=False),  # sum over the steps of the squared norm
    Part("maxima", 1, 0, "max", from_rows=True, count=False),  # the largest per-step squared norm
    Part("counts", COLUMNS, 0, "sum", from_rows=True, count=True),  # histogram buckets, then non-finite steps
    Part("tensors", TENSOR_COUNTS, 1, "sum", from_rows=False, count=True),  # tensor-steps: vanishing, exploding
    # The epoch's sampled index of the largest square (float32: exact below 2**24 sampled steps per epoch).
    # Replicated across ranks that sample in lockstep, so the holders' rounded mean is it.
    Part("max_steps", 1, 0, "first_at_max", from_rows=True, count=True),
)
#: The parts computed from per-step squares: what a sharded slot's reduced rows give (``ranks.ShardedChunks``).
ROW_PARTS = tuple(part for part in PARTS if part.from_rows)


class StatisticsLayout:
    """Where each part of ``slot_count`` slots' statistics lies in the flat vector, and how parts combine."""

    def __init__(self, slot_count: int, parts: Sequence[Part] = PARTS) -> None:
        self.slot_count = slot_count
        self.parts = tuple(parts)
        self.lengths = [part.width * slot_count for part in self.parts]
        self.length = sum(self.lengths)

    def _shape(self, part: Part) -> tuple[int, ...]:
        if part.width == 1:
            return (self.slot_count,)
        return (self.slot_count, part.width) if part.slot_axis == 0 else (part.width, self.slot_count)

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each part as a view of ``flat`` (the layout's first ``length`` values), in its shape."""
        pieces = flat[: self.length].split(self.lengths)
        return {part.name: piece.view(self._shape(part)) for part, piece in zip(self.parts, pieces)}

    def zeros(self, device: torch.device) -> torch.Tensor:
        return torch.zeros(self.length, dtype=torch.float32, device=device)

    def blank(self, device: torch.device) -> torch.Tensor:
        """A vector to :meth:`gather` segments into: each part at its combine's identity."""
        vector = self.zeros(device)
        for part, piece in zip(self.parts, vector.split(self.lengths)):
            if IDENTITY[part.segments]:
                piece.fill_(IDENTITY[part.segments])
        return vector

    def _ordered(self) -> list[Part]:
        # An index kept at the larger maximum reads the maxima before they are combined.
        return sorted(self.parts, key=lambda part: part.segments != "first_at_max")

    def host(self, values: Sequence[float]) -> dict[str, Sequence[float]]:
        """Each part's values as copied to the host, flat (in the part's shape's row-major order)."""
        out: dict[str, Sequence[float]] = {}
        start = 0
        for part, length in zip(self.parts, self.lengths):
            out[part.name] = values[start : start + length]
            start += length
        return out

    def add(self, running: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]) -> None:
        """Fold a later batch of steps' statistics of the same slots into running ones, in place."""
        for part in self._ordered():
            if part.name not in batch:
                continue
            into, value = running[part.name], batch[part.name]
            if part.segments == "sum":
                into += value
            elif part.segments == "max":
                torch.maximum(into, value, out=into)
            else:  # the running steps are earlier: a later batch's index only where its maximum is larger
                later = batch[MAX_KEYS] if MAX_KEYS in batch else max_keys(batch["maxima"])
                torch.where(later > max_keys(running["maxima"]), value, into, out=into)

    def gather(
        self, into: Mapping[str, torch.Tensor], source: Mapping[str, torch.Tensor], target: torch.Tensor
    ) -> None:
        """Fold one segment's statistics (its slots, in order) into ``into``'s slots ``target`` (``blank``
        at first); segments come in any order, so an index is kept by its maximum, then the earlier."""
        for part in self._ordered():
            axis = part.slot_axis
            value = source[part.name].to(into[part.name].device)
            if part.segments == "sum":
                into[part.name].index_add_(axis, target, value)
            elif part.segments == "max":
                into[part.name].scatter_reduce_(axis, target, value, reduce="amax")
            else:
                mine = max_keys(source["maxima"].to(value.device))
                theirs = max_keys(into["maxima"].index_select(axis, target))
                steps = into[part.name].index_select(axis, target)
                take = (mine > theirs) | ((mine == theirs) & (value < steps))
                into[part.name].index_copy_(axis, target, torch.where(take, value, steps))

    def place(
        self,
        into: Mapping[str, torch.Tensor],
        source: Mapping[str, torch.Tensor],
        source_slots: torch.Tensor,
        target_slots: torch.Tensor,
        parts: Sequence[Part] | None = None,
    ) -> None:
        """Copy the ``source_slots`` of another layout's statistics into this one's ``target_slots``."""
        for part in self.parts if parts is None else parts:
            axis = part.slot_axis
            value = source[part.name].index_select(axis, source_slots)
            into[part.name].index_copy_(axis, target_slots, value.to(into[part.name].dtype))

    def holders_mean(self, views: Mapping[str, torch.Tensor], holders: torch.Tensor) -> dict[str, torch.Tensor]:
        """Replicated slots across ranks: each rank's values are the global ones, so the sum the ranks
        made is divided by how many held the slot (``holders``, per slot, at least 1); counts rounded."""
        out = {}
        for part in self.parts:
            scale = holders.unsqueeze(1) if part.width > 1 and part.slot_axis == 0 else holders
            value = views[part.name] / scale
            out[part.name] = value.round() if part.count else value
        return out

    def flat(self, views: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The parts back in one flat vector, in layout order."""
        return torch.cat([views[part.name].flatten().float() for part in self.parts])


def bucket_bounds(device: torch.device) -> torch.Tensor:
    """The histogram's bounds, squared (the rows hold squared norms: no sqrt per step), and a last bound
    at float32's largest value, so a finite square above the top bound falls in the top bucket and only
    NaN and Inf fall past it, in the non-finite column."""
    bounds = [b * b for b in HISTOGRAM_BOUNDARIES] + [torch.finfo(torch.float32).max]
    return torch.tensor(bounds, dtype=torch.float32, device=device)


def max_keys(squares: torch.Tensor) -> torch.Tensor:
    """Squares as they rank for the largest step: NaN and Inf alike above every finite one (so the first
    non-finite step is the one kept), whereas ``amax`` puts NaN above Inf."""
    return squares.nan_to_num(nan=math.inf, posinf=math.inf)


def slot_statistics(rows: torch.Tensor, bounds: torch.Tensor, first: int = 0) -> dict[str, torch.Tensor]:
    """``[steps, slots]`` squared norms of the consecutive sampled steps from index ``first`` -> the
    ``ROW_PARTS`` of their statistics: per slot the sum, the largest step and its index (the first on
    ties), and ``[slots, COLUMNS]`` counts (histogram buckets, then non-finite steps); with ``MAX_KEYS``.
    A dozen ops for any number of steps; ``first`` is a Python number added on the device (no copy)."""
    slots = rows.shape[1]
    columns = torch.bucketize(rows, bounds)  # (b[i-1], b[i]]: OpenTelemetry's explicit buckets
    columns += torch.arange(0, slots * COLUMNS, COLUMNS, device=rows.device)
    counts = torch.bincount(columns.flatten(), minlength=slots * COLUMNS).view(slots, COLUMNS)
    keys, at = max_keys(rows).max(0)  # the first of equal maxima, as torch documents
    steps = at.float() + first
    return {"sums": rows.sum(0), "maxima": rows.amax(0), "counts": counts, "max_steps": steps, MAX_KEYS: keys}
