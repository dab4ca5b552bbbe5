"""Exact per-layer summaries across the ranks of ``torch.distributed``, exported by one rank.

Squared L2 norms add, so the epoch statistic needs no per-step communication: each rank measures
the gradient it holds, and at the epoch end one SUM all-reduce of a single float32 vector (every
seed's layers and totals, the per-rank sampled-step counts and a layout flag) gives every rank the
same global sums. The step path stays local: no collective, no host sync.

Two kinds of gradient, told apart by their parameter:

* A ``DTensor`` parameter (FSDP2 ``fully_shard``, tensor parallel) is measured on its local shard.
  Shards partition the gradient along the mesh's ``Shard`` dimensions and repeat it along the others,
  so a rank's squares are weighted by ``1 / replicas`` and summed: exact, whatever the shard sizes,
  an empty shard included.
* A plain parameter (DDP, or a module living on some ranks only) is taken to be replicated across the
  ranks that hold it, as DDP makes it: its value is the mean over the ranks that saw a gradient for
  it in the epoch, so a rank where the seed sat idle does not dilute it.

Ranks may hold different seeds. The vector's layout is the sorted union of every rank's
``(seed, layer)`` slots, agreed with one ``all_gather_object`` when some rank's seeds, layers or
stages changed; the all-reduce carries the "changed" flag, so a steady run pays the all-reduce only.
Every rank ends the epoch with the same summary, stages included, and Tamiyo may read it on any rank.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from .epoch import (
    COLUMNS,
    TOTAL,
    EpochSums,
    HostFacts,
    Segment,
    Slot,
    bucket_bounds,
    epoch_sums,
    fold_statistics,
    host_facts,
    slot_statistics,
    statistics_length,
)
from .norms import GradientHolder
from .settings import ENV_EXPORT_RANK, SettingsError

if TYPE_CHECKING:
    from opentelemetry.sdk.resources import Resource

#: Resource attributes (no semantic convention names the rank; these follow ``torch.distributed``'s own API).
RANK_ATTRIBUTE = "torch.distributed.rank"
WORLD_SIZE_ATTRIBUTE = "torch.distributed.world_size"
#: What one rank holds: the slots it measured this epoch, the stages of the seeds listed at its end,
#: its slots holding a DTensor shard, and its sampled steps when it has one (the rows reduced for them).
Descriptor = tuple[tuple[Slot, ...], tuple[tuple[str, str], ...], tuple[Slot, ...], int]

_logger = logging.getLogger(__name__)


def process_group() -> tuple[int, int] | None:
    """``(rank, world_size)`` of the default process group, or None when ``torch.distributed`` is not in use."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    return dist.get_rank(), dist.get_world_size()


def distributed_resource() -> Resource:
    """The rank and world size as resource attributes; empty when ``torch.distributed`` is not in use.

    Resource, not point, attributes: the points of one run must not multiply by the world size.
    """
    from opentelemetry.sdk.resources import Resource  # the SDK, only where a provider is configured

    group = process_group()
    if group is None:
        return Resource.get_empty()
    return Resource({RANK_ATTRIBUTE: group[0], WORLD_SIZE_ATTRIBUTE: group[1]})


def _dtensor_type() -> type | None:
    """The DTensor class, imported only under torch.distributed (its import costs about a second)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None  # a DTensor needs a process group: without one, no parameter can be one
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch older than 2.5 has it under a private name
        from torch.distributed._tensor import DTensor
    return DTensor


class LocalShard:
    """A DTensor parameter as :class:`GradientSquares` sees it: its gradient is the local shard.

    A DTensor gradient in ``torch._foreach_norm`` would reduce across ranks at every step; the local
    shard keeps the step path free of collectives.
    """

    __slots__ = ("device", "dtype", "param")

    def __init__(self, param: nn.Parameter) -> None:
        self.param = param
        self.device = param.device
        self.dtype = param.dtype

    @property
    def grad(self) -> torch.Tensor | None:
        grad = self.param.grad
        return None if grad is None else grad.to_local()  # type: ignore[attr-defined]  # a DTensor


def local_gradients(params: Sequence[nn.Parameter]) -> list[GradientHolder]:
    """The parameters to measure: DTensors by their local shard, plain tensors as they are."""
    dtensor = _dtensor_type()
    if dtensor is None:
        return list(params)
    return [LocalShard(param) if isinstance(param, dtensor) else param for param in params]


def shard_weight(param: nn.Parameter) -> float | None:
    """The weight of this rank's squares of a DTensor ``param``, ``1 / replicas``; None for a plain tensor."""
    dtensor = _dtensor_type()
    if dtensor is None or not isinstance(param, dtensor):
        return None
    mesh = param.device_mesh
    return 1.0 / math.prod(mesh.size(dim) for dim, placement in enumerate(param.placements)
                           if not placement.is_shard())


@dataclass(frozen=True)
class SlotLayout:
    """The slots every rank agreed on, each seed's stage (the lowest rank listing it wins), the slots
    holding a sharded gradient on some rank, and the per-step rows reduced for them (the most steps
    any rank sampled; 0 when no slot is sharded)."""

    slots: tuple[Slot, ...]
    stages: Mapping[str, str]
    sharded: tuple[Slot, ...] = ()
    steps: int = 0

    @classmethod
    def agree(cls, descriptors: Sequence[Descriptor]) -> SlotLayout:
        stages: dict[str, str] = {}
        slots: set[Slot] = set()
        sharded: set[Slot] = set()
        for rank_slots, rank_stages, rank_sharded, _ in descriptors:  # in rank order
            slots.update(rank_slots)
            sharded.update(rank_sharded)
            for seed_id, stage in rank_stages:
                stages.setdefault(seed_id, stage)
        steps = max(steps for _, _, _, steps in descriptors) if sharded else 0
        return cls(tuple(sorted(slots)), dict(sorted(stages.items())), tuple(sorted(sharded)), steps)


class RankReduction:
    """One rank's side of the epoch reduction. Every rank must call :meth:`reduce` at every epoch end.

    A plain gradient is replicated across the ranks that hold it (DDP), so each rank's own per-step
    statistics of it (sum, largest step, histogram, non-finite steps: ``Segment.stats``) are already
    the global ones: the ranks that measured a slot add theirs and divide by their number. A sharded
    gradient's step norm exists only once the ranks' squares are summed, so for the slots holding a
    DTensor shard the per-step rows (``Segment.rows``) are summed too, and their largest step and
    histogram computed from the sums. One SUM all-reduce, its size fixed by the slots alone while
    no gradient is sharded.
    """

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank = rank
        self.world_size = world_size
        self._agreed: SlotLayout | None = None  # agreed lazily, at the first epoch end
        self._contributed: Descriptor | None = None  # what this rank said at the last agreement
        self._warned_steps = False

    @classmethod
    def current(cls, export_rank: int) -> RankReduction | None:
        """The reduction for the default process group, or None when ``torch.distributed`` is not in use."""
        group = process_group()
        if group is None:
            return None
        if export_rank >= group[1]:
            raise SettingsError(f"export_rank={export_rank} is not valid: expected a rank from 0 to {group[1] - 1} "
                                f"(world size {group[1]}; set by {ENV_EXPORT_RANK})")
        return cls(*group)

    @torch.no_grad()
    def reduce(self, segments: Sequence[Segment] | None, steps: int, stages: Mapping[str, str],
               home: torch.device) -> tuple[EpochSums, Mapping[str, str]]:
        """All-reduce the epoch: one collective while no rank's slots or stages changed (nor, with a
        sharded gradient, its step count); when some did, a layout exchange and a second all-reduce
        in the agreed new layout.

        ``segments`` is None on a rank that failed to measure: it still takes part, contributing
        nothing, so no rank is left waiting in a collective.
        """
        facts = None
        try:
            if segments is not None:
                for segment in segments:
                    segment.absorb()
                facts = host_facts(segments)
        except Exception:  # telemetry must never stop (or hang) training
            _logger.warning("tolaria_otel: rank %d could not measure its epoch; it contributes nothing",
                            self.rank, exc_info=True)
            segments, facts = None, None
        sharded = () if segments is None or facts is None else _sharded_slots(segments)
        descriptor: Descriptor = ((() if facts is None else facts.slots), tuple(sorted(stages.items())), sharded,
                                  steps if sharded else 0)
        if self._agreed is None:
            self._agree(descriptor)
        changed = descriptor != self._contributed
        # A changed rank's contribution in the old layout is discarded: it sends only the flag.
        values = self._all_reduce(None if changed else segments, facts, steps, home, changed=changed)
        if values[-1]:  # some rank's layout changed: agree on the new one and reduce again in it
            self._agree(descriptor)
            values = self._all_reduce(segments, facts, steps, home, changed=False)
        assert self._agreed is not None
        return self._epoch(values), self._agreed.stages

    def _all_reduce(self, segments: Sequence[Segment] | None, facts: HostFacts | None, steps: int,
                    home: torch.device, changed: bool) -> list[float]:
        """Reduce, and compute the statistics on the device: the epoch's one host copy (steady state)."""
        layout = self._agreed
        assert layout is not None
        device = _collective_device(home)
        tail = [0.0] * (self.world_size + 1)  # the sampled steps of every rank, then "layout changed"
        tail[self.rank] = float(steps)
        tail[-1] = float(changed)
        try:
            vector = self._local(segments, facts, layout, device)
        except Exception:  # telemetry must never stop (or hang) training
            _logger.warning("tolaria_otel: rank %d could not measure its epoch; it contributes nothing",
                            self.rank, exc_info=True)
            vector = torch.zeros(_length(layout), dtype=torch.float32, device=device)
        vector = torch.cat([vector, torch.tensor(tail, dtype=torch.float32).to(device)])
        dist.all_reduce(vector)
        return torch.cat([_statistics(vector, layout), vector[-(self.world_size + 1):]]).tolist()

    def _local(self, segments: Sequence[Segment] | None, facts: HostFacts | None, layout: SlotLayout,
               device: torch.device) -> torch.Tensor:
        """This rank's contribution in the agreed layout: the statistics of the slots it measured, the
        host facts, then the sharded slots' per-step rows."""
        n, k = len(layout.slots), len(layout.sharded)
        vector = torch.zeros(_length(layout), dtype=torch.float32, device=device)
        if segments is None or facts is None:
            return vector
        index = {slot: i for i, slot in enumerate(layout.slots)}
        # The slots this rank measured: one that held no gradient here must not dilute the mean.
        mine = [(i, index[slot]) for i, (slot, measured) in enumerate(zip(facts.slots, facts.measured))
                if measured and slot in index]
        if mine:
            m = len(facts.slots)
            sums, maxima, counts = fold_statistics(segments, facts, device).to(device).split([m, m, m * COLUMNS])
            source = torch.tensor([i for i, _ in mine], dtype=torch.long, device=device)
            target = torch.tensor([j for _, j in mine], dtype=torch.long, device=device)
            into_sums, into_maxima, into_counts = vector[:statistics_length(n)].split([n, n, n * COLUMNS])
            into_sums[target] = sums[source]
            into_maxima[target] = maxima[source]
            into_counts.view(n, COLUMNS)[target] = counts.view(m, COLUMNS)[source]
        host = [0.0] * (4 * n)  # measured, numel, a seed's steps and 1 per listing rank: copied to the device once
        for slot, measured, numel in zip(facts.slots, facts.measured, facts.numel):
            i = index.get(slot)
            if i is None:
                continue
            host[i] = float(measured)
            host[n + i] = float(numel) if measured else 0.0
            if slot[1] == TOTAL and slot[0] in facts.seed_steps:
                host[2 * n + i] = float(facts.seed_steps[slot[0]])
                host[3 * n + i] = 1.0
        start = statistics_length(n)
        vector[start:start + 4 * n] = torch.tensor(host, dtype=torch.float32).to(device)
        if k:
            rows = vector[start + 4 * n:].view(layout.steps, 2 * k)
            sharded_index = {slot: j for j, slot in enumerate(layout.sharded)}
            for segment in segments:
                columns = [sharded_index[slot] for slot in segment.sharded_slots]
                into = torch.tensor(columns + [k + j for j in columns], dtype=torch.long, device=device)
                for step_indices, segment_rows in segment.rows:
                    at = torch.tensor(step_indices, dtype=torch.long, device=device).unsqueeze(1)
                    rows.index_put_((at, into.unsqueeze(0)), segment_rows.to(device), accumulate=True)
        return vector

    def _epoch(self, values: list[float]) -> EpochSums:
        layout = self._agreed
        assert layout is not None
        n = len(layout.slots)
        length = statistics_length(n)
        measured, numel, seed_steps, holders = (values[length + i * n:length + (i + 1) * n] for i in range(4))
        facts = HostFacts(
            layout.slots, tuple(m > 0 for m in measured),
            tuple(round(size / max(m, 1.0)) for size, m in zip(numel, measured)),
            {slot[0]: round(total / count) for slot, total, count in zip(layout.slots, seed_steps, holders)
             if slot[1] == TOTAL and count})
        return epoch_sums(facts, values[:length], self._agreed_steps(values[-(self.world_size + 1):-1]))

    def _agree(self, descriptor: Descriptor) -> None:
        """Agree on the slot layout: every rank learns what every other rank holds."""
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, descriptor)
        self._agreed = SlotLayout.agree(gathered)
        self._contributed = descriptor

    def _agreed_steps(self, counts: list[float]) -> int:
        """Ranks step together, so their counts agree; if one fell behind, the most any rank saw."""
        if min(counts) != max(counts) and not self._warned_steps:
            self._warned_steps = True
            _logger.warning("tolaria_otel: ranks sampled different numbers of steps this epoch (%s); "
                            "reporting the largest", ", ".join(str(int(c)) for c in counts))
        return int(max(counts))


def _sharded_slots(segments: Sequence[Segment]) -> tuple[Slot, ...]:
    """The slots holding a DTensor shard in some segment that sampled steps this epoch."""
    return tuple(sorted({slot for segment in segments if segment.steps for slot in segment.sharded_slots}))


def _length(layout: SlotLayout) -> int:
    """The reduced vector before its tail: ``[statistics | measured | numel | seed steps | holders | rows]``."""
    n = len(layout.slots)
    return statistics_length(n) + 4 * n + 2 * layout.steps * len(layout.sharded)


def _statistics(vector: torch.Tensor, layout: SlotLayout) -> torch.Tensor:
    """From the reduced vector, on the device: the statistics (``epoch.statistics_length``), then what the
    host knew, ``[measured | numel | seed steps | holders]``. A plain gradient is taken to be replicated
    across the ranks that measured it, so what they added is divided by their number; a sharded slot's
    statistics come from its summed per-step rows."""
    n, k = len(layout.slots), len(layout.sharded)
    start = statistics_length(n)
    host = vector[start:start + 4 * n]
    holders = host[:n].clamp(min=1.0)
    sums, maxima, counts = vector[:start].split([n, n, n * COLUMNS])
    sums, maxima = sums / holders, maxima / holders
    counts = (counts.view(n, COLUMNS) / holders.unsqueeze(1)).round()
    if k and layout.steps:
        rows = vector[start + 4 * n:start + 4 * n + 2 * layout.steps * k].view(layout.steps, 2 * k)
        index = {slot: i for i, slot in enumerate(layout.slots)}
        columns = torch.tensor([index[slot] for slot in layout.sharded], dtype=torch.long, device=vector.device)
        steps = rows[:, :k] / holders[columns] + rows[:, k:]  # plain squares, then the shards'
        sums[columns], maxima[columns], sharded_counts = slot_statistics(steps, bucket_bounds(vector.device))
        counts[columns] = sharded_counts.float()
    return torch.cat([sums, maxima, counts.flatten(), host])


def _collective_device(preferred: torch.device) -> torch.device:
    """Where the sums already are, unless the backend (NCCL) cannot reduce CPU tensors."""
    backend = str(dist.get_backend())
    if preferred.type != "cpu" or "gloo" in backend or backend == "mpi":
        return preferred
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and accelerator.is_available():
        kind = accelerator.current_accelerator().type
        return torch.device(kind, accelerator.current_device_index())
    return torch.device("cuda", torch.cuda.current_device())
