"""Exact per-layer summaries across the ranks of ``torch.distributed``, exported by one rank.

Squared L2 norms add, so the epoch statistic needs little communication, and none that grows with the
epoch's length: each rank measures the gradient it holds, and at the epoch end one SUM all-reduce of a
float32 vector (every seed's layers and totals, the per-rank sampled-step counts and a layout flag),
whose size the slots fix, gives every rank the same global values. The step path stays local and
free of host syncs.

Two kinds of gradient, told apart by their parameter:

* A plain parameter (DDP, or a module living on some ranks only) is taken to be replicated across the
  ranks that hold it, as DDP makes it: each rank's own statistics of it (sum, largest step, histogram,
  non-finite steps) are the global ones, so the ranks that saw a gradient for it in the epoch add
  theirs and divide by their number; a rank where the seed sat idle does not dilute it.
* A ``DTensor`` parameter (FSDP2 ``fully_shard``, HSDP, tensor parallel) is measured on its local shard.
  Shards partition the gradient along the mesh's ``Shard`` dimensions and repeat it along the others,
  so a rank's squares are weighted by ``1 / replicas`` and summed: exact, whatever the shard sizes, an
  empty shard included. A step's norm exists only once they are summed, so the per-step squares of
  these slots are all-reduced in fixed chunks of steps, asynchronously (:class:`ShardedChunks`).

Ranks may hold different seeds. The vector's layout is the sorted union of every rank's
``(seed, layer)`` slots, agreed with one ``all_gather_object`` when some rank's seeds, layers, stages or
sharded slots changed; the all-reduce carries the "changed" flag, so a steady run pays the all-reduce
only. Every rank ends the epoch with the same summary, stages included, and Tamiyo may read it on any rank.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..config.settings import ENV_EXPORT_RANK, SettingsError
from ..measure.clip_facts import ClipTotals
from ..measure.segment import TOTAL, Segment, Slot
from ..measure.statistics import PARTS, ROW_PARTS, StatisticsLayout, bucket_bounds, slot_statistics
from .fold import EpochSums, HostFacts, epoch_sums, fold_statistics, host_facts

#: What one rank holds: the slots it measured this epoch, the stages of the seeds listed in it (and
#: whether each is still listed at its end),
#: its slots holding a DTensor shard, and its sampled steps when it has one (the rows reduced for them).
Descriptor = tuple[tuple[Slot, ...], tuple[tuple[str, str, bool], ...], tuple[Slot, ...], int]

#: Per-slot facts only the host knows, sent with the statistics: measured, numel, seed steps, holders, tensors.
HOST_FACTS = 5

_logger = logging.getLogger(__name__)


def process_group() -> tuple[int, int] | None:
    """``(rank, world_size)`` of the default process group, or None when ``torch.distributed`` is not in use."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    return dist.get_rank(), dist.get_world_size()


@dataclass(frozen=True)
class SlotLayout:
    """The slots every rank agreed on, each seed's stage (the lowest rank listing it wins), the slots
    holding a sharded gradient on some rank, and the per-step rows reduced for them (the most steps
    any rank sampled; 0 when no slot is sharded)."""

    slots: tuple[Slot, ...]
    stages: Mapping[str, str]
    sharded: tuple[Slot, ...] = ()
    steps: int = 0
    left: frozenset[str] = frozenset()  # seeds no rank lists at the epoch end

    @classmethod
    def agree(cls, descriptors: Sequence[Descriptor]) -> SlotLayout:
        stages: dict[str, str] = {}
        listed: set[str] = set()
        slots: set[Slot] = set()
        sharded: set[Slot] = set()
        for rank_slots, rank_stages, rank_sharded, _ in descriptors:  # in rank order
            slots.update(rank_slots)
            sharded.update(rank_sharded)
            for seed_id, stage, at_end in rank_stages:
                stages.setdefault(seed_id, stage)
                if at_end:
                    listed.add(seed_id)
        steps = max(steps for _, _, _, steps in descriptors) if sharded else 0
        return cls(
            tuple(sorted(slots)),
            dict(sorted(stages.items())),
            tuple(sorted(sharded)),
            steps,
            frozenset(stages.keys() - listed),
        )


#: Sampled steps whose per-step squares of the sharded slots are summed across ranks by one
#: asynchronous all-reduce, issued when the chunk fills and waited on when the next one does. The
#: step path's flush period (``norms.FLUSH_EVERY``): a chunk's rows are there already, and the last,
#: partial chunk the epoch end reduces costs 2 x 64 + 1 values per sharded slot.
CHUNK_STEPS = 64


class ShardedChunks:
    """The per-step squares of the slots holding a DTensor shard, summed across ranks CHUNK_STEPS steps
    at a time, with the sums' total, largest step and histogram kept running on the device: memory
    and traffic per chunk fixed by the slots, whatever the epoch's length.

    Every rank runs the same chunks: the slots were agreed by all ranks, and a chunk is issued at every
    CHUNK_STEPS-th sampled step (measured or not), which ranks stepping together, as sharded training
    does, reach together. A chunk is ``[CHUNK_STEPS, plain squares | shards' squares]`` and, per slot,
    how many ranks had plain squares in it (a plain gradient is replicated: its mean is its value).
    """

    def __init__(self, slots: tuple[Slot, ...]) -> None:
        self.slots = slots
        self.length = (2 * CHUNK_STEPS + 1) * len(slots)
        self._index = {slot: j for j, slot in enumerate(slots)}
        self.layout = StatisticsLayout(len(slots), ROW_PARTS)
        self._stats: torch.Tensor | None = None  # the ROW_PARTS of the chunks reduced so far
        self._in_flight: tuple[dist.Work, torch.Tensor, int] | None = None  # with its first epoch step index
        self._first = 0  # epoch step index of the current chunk's first row
        self._stepped = 0  # sampled steps this epoch, measured or not
        self._warned = False

    @property
    def tail_steps(self) -> int:
        """Sampled steps since the last full chunk: the rows of the chunk the epoch end reduces."""
        return self._stepped % CHUNK_STEPS

    def stepped(self, segments: Iterable[Segment], epoch_steps: int, home: torch.device) -> None:
        """A sampled step passed; at every CHUNK_STEPS-th, wait on the last chunk and issue this one."""
        self._stepped += 1
        if not self.slots or self._stepped % CHUNK_STEPS:
            return
        segments = list(segments)
        device = _collective_device(home)
        try:
            for segment in segments:
                segment.absorb()
            block = self.block(segments, device)
        except Exception:  # noqa: BLE001 - telemetry must never stop (or hang) training: take part with zeros
            self._warn("could not measure a chunk of sharded steps")
            block = torch.zeros(self.length, dtype=torch.float32, device=device)
        self.wait()
        try:
            self._in_flight = dist.all_reduce(block, async_op=True), block, self._first
        except Exception:  # noqa: BLE001
            self._warn("could not all-reduce a chunk of sharded steps")
        self._first = epoch_steps
        for segment in segments:  # rows of slots outside the chunks wait for the epoch end
            if all(slot in self._index for slot in segment.sharded_slots):
                segment.rows = []

    def block(self, segments: Sequence[Segment] | None, device: torch.device) -> torch.Tensor:
        """This rank's chunk: the rows of the steps since the last one, in the agreed slots."""
        k = len(self.slots)
        block = torch.zeros(self.length, dtype=torch.float32, device=device)
        if not k or segments is None:
            return block
        rows = block[: 2 * CHUNK_STEPS * k].view(CHUNK_STEPS, 2 * k)
        for segment in segments:
            known = [i for i, slot in enumerate(segment.sharded_slots) if slot in self._index]
            if not known or not segment.rows:
                continue
            width = len(segment.sharded_slots)
            picked = torch.tensor(known + [width + i for i in known], dtype=torch.long)
            columns = [self._index[segment.sharded_slots[i]] for i in known]
            into = torch.tensor(columns + [k + j for j in columns], dtype=torch.long, device=device).unsqueeze(0)
            for step_indices, segment_rows in segment.rows:
                mine = [
                    (i, step - self._first)
                    for i, step in enumerate(step_indices)
                    if 0 <= step - self._first < CHUNK_STEPS
                ]
                if not mine:
                    continue
                source = torch.tensor([i for i, _ in mine], dtype=torch.long, device=segment_rows.device)
                at = torch.tensor([row for _, row in mine], dtype=torch.long, device=device).unsqueeze(1)
                values = segment_rows.index_select(0, source).index_select(1, picked.to(segment_rows.device))
                rows.index_put_((at, into), values.to(device), accumulate=True)
        block[2 * CHUNK_STEPS * k :] = (rows[:, :k] != 0).any(0)
        return block

    def wait(self) -> None:
        """Wait on the chunk in flight (on the device's stream: no host sync) and fold it in."""
        if self._in_flight is None:
            return
        work, block, first = self._in_flight
        self._in_flight = None
        try:
            work.wait()
            self._stats = self.statistics(block, CHUNK_STEPS, first)
        except Exception:  # noqa: BLE001
            self._warn("could not fold a chunk of sharded steps")

    @property
    def first(self) -> int:
        """The epoch step index of the chunk being filled's first row (its largest step's offset)."""
        return self._first

    def statistics(self, block: torch.Tensor, steps: int, first: int) -> torch.Tensor:
        """The running ``ROW_PARTS`` statistics with a reduced chunk's first ``steps`` rows, from epoch step
        index ``first``, folded in."""
        k = len(self.slots)
        layout = self.layout
        if not steps:  # an epoch of whole chunks: its last one is empty
            return layout.zeros(block.device) if self._stats is None else self._stats
        rows = block[: 2 * CHUNK_STEPS * k].view(CHUNK_STEPS, 2 * k)[:steps]
        holders = block[2 * CHUNK_STEPS * k :].clamp(min=1.0)
        chunk = slot_statistics(rows[:, :k] / holders + rows[:, k:], bucket_bounds(block.device), first)
        if self._stats is None:
            return layout.flat(chunk)
        total = self._stats.to(block.device).clone()
        layout.add(layout.views(total), chunk)
        return total

    def _warn(self, what: str) -> None:
        _logger.log(
            logging.DEBUG if self._warned else logging.WARNING,
            "tolaria_otel: %s; it contributes nothing to it",
            what,
            exc_info=not self._warned,
        )
        self._warned = True


class EpochVector:
    """The vector the ranks add at an epoch end, in one agreed layout: what this rank puts in it
    (:meth:`pack`), and what their sum says (:meth:`statistics`, then :meth:`epoch` on the host).

    ``[statistics | tensor counts | measured | numel | seed steps | holders | gradient tensors | last chunk |
    unchunked rows]``: the per-slot values the ranks add (``StatisticsLayout``), the facts only the host knows
    (``HOST_FACTS`` per slot), the last, partial chunk of the sharded slots (:class:`ShardedChunks`), and the
    per-step rows of the sharded slots the chunks did not carry.
    """

    def __init__(self, layout: SlotLayout, chunks: ShardedChunks) -> None:
        self.layout = layout
        self.chunks = chunks
        #: The sharded slots whose rows the epoch end reduces: those the chunks did not carry.
        self.unchunked = tuple(slot for slot in layout.sharded if slot not in chunks.slots)
        n = len(layout.slots)
        rows = 2 * layout.steps * len(self.unchunked)
        self.length = StatisticsLayout(n).length + HOST_FACTS * n + chunks.length + rows

    def pack(self, segments: Sequence[Segment] | None, facts: HostFacts | None, device: torch.device) -> torch.Tensor:
        """This rank's contribution in the agreed layout: the statistics of the slots it measured, the
        host facts, the last chunk, then the rows of the sharded slots not chunked."""
        layout = self.layout
        n = len(layout.slots)
        vector = torch.zeros(self.length, dtype=torch.float32, device=device)
        if segments is None or facts is None:
            return vector
        index = {slot: i for i, slot in enumerate(layout.slots)}
        # The slots this rank measured: one that held no gradient here must not dilute the mean.
        mine = [
            (i, index[slot])
            for i, (slot, measured) in enumerate(zip(facts.slots, facts.measured))
            if measured and slot in index
        ]
        if mine:
            own = StatisticsLayout(len(facts.slots)).views(fold_statistics(segments, facts, device).to(device))
            source = torch.tensor([i for i, _ in mine], dtype=torch.long, device=device)
            target = torch.tensor([j for _, j in mine], dtype=torch.long, device=device)
            statistics = StatisticsLayout(n)
            statistics.place(statistics.views(vector), own, source, target)
        # measured, numel, a seed's steps, 1 per listing rank and the gradient tensors: copied to the device once
        host = [0.0] * (HOST_FACTS * n)
        for slot, measured, numel, tensor_count in zip(facts.slots, facts.measured, facts.numel, facts.tensors):
            i = index.get(slot)
            if i is None:
                continue
            host[i] = float(measured)
            host[n + i] = float(numel) if measured else 0.0
            host[4 * n + i] = float(tensor_count) if measured else 0.0
            if slot[1] == TOTAL and slot[0] in facts.seed_steps:
                host[2 * n + i] = float(facts.seed_steps[slot[0]])
                host[3 * n + i] = 1.0
        start = StatisticsLayout(n).length
        vector[start : start + HOST_FACTS * n] = torch.tensor(host, dtype=torch.float32).to(device)
        start += HOST_FACTS * n
        vector[start : start + self.chunks.length] = self.chunks.block(segments, device)
        start += self.chunks.length
        unchunked = self.unchunked
        if unchunked:
            k = len(unchunked)
            rows = vector[start:].view(layout.steps, 2 * k)
            unchunked_index = {slot: j for j, slot in enumerate(unchunked)}
            for segment in segments:
                known = [i for i, slot in enumerate(segment.sharded_slots) if slot in unchunked_index]
                if not known:
                    continue
                width = len(segment.sharded_slots)
                picked = torch.tensor(known + [width + i for i in known], dtype=torch.long)
                columns = [unchunked_index[segment.sharded_slots[i]] for i in known]
                into = torch.tensor(columns + [k + j for j in columns], dtype=torch.long, device=device).unsqueeze(0)
                for step_indices, segment_rows in segment.rows:
                    at = torch.tensor(step_indices, dtype=torch.long, device=device).unsqueeze(1)
                    values = segment_rows.index_select(1, picked.to(segment_rows.device))
                    rows.index_put_((at, into), values.to(device), accumulate=True)
        return vector

    def statistics(self, vector: torch.Tensor) -> torch.Tensor:
        """From the reduced vector, on the device: the statistics (``StatisticsLayout``, tensor
        counts included), then what the host knew, ``[measured | numel |
        seed steps | holders | gradient tensors]``. A plain gradient is taken to be replicated across the
        ranks that measured it, so what they added is divided by their number; a sharded slot's statistics
        come from its summed per-step squares (chunks, or the epoch's rows), and its tensor counts are NaN
        (not known: a shard's norm is not its tensor's)."""
        layout = self.layout
        n = len(layout.slots)
        statistics = StatisticsLayout(n)
        index = {slot: i for i, slot in enumerate(layout.slots)}
        start = statistics.length
        host = vector[start : start + HOST_FACTS * n]
        holders = host[:n].clamp(min=1.0)
        parts = statistics.holders_mean(statistics.views(vector), holders)
        sharded = [index[slot] for slot in layout.sharded if slot in index]
        if sharded:  # counted per gradient tensor: a shard's norm is not its tensor's
            columns = torch.tensor(sharded, dtype=torch.long, device=vector.device)
            for part in PARTS:
                if not part.from_rows:
                    parts[part.name].index_fill_(part.slot_axis, columns, math.nan)
        start += HOST_FACTS * n
        chunked = [(j, index[slot]) for j, slot in enumerate(self.chunks.slots) if slot in index]
        if chunked:
            tail = vector[start : start + self.chunks.length]
            chunk = self.chunks.statistics(tail, self.chunks.tail_steps, self.chunks.first)
            source = torch.tensor([j for j, _ in chunked], dtype=torch.long, device=vector.device)
            target = torch.tensor([i for _, i in chunked], dtype=torch.long, device=vector.device)
            statistics.place(parts, self.chunks.layout.views(chunk), source, target, ROW_PARTS)
        start += self.chunks.length
        unchunked = self.unchunked
        if unchunked and layout.steps:
            k = len(unchunked)
            rows = vector[start : start + 2 * layout.steps * k].view(layout.steps, 2 * k)
            columns = torch.tensor([index[slot] for slot in unchunked], dtype=torch.long, device=vector.device)
            steps = rows[:, :k] / holders[columns] + rows[:, k:]  # plain squares, then the shards'
            reduced = slot_statistics(steps, bucket_bounds(vector.device))  # rows by epoch step index: first 0
            every = torch.arange(k, device=vector.device)
            statistics.place(parts, reduced, every, columns, ROW_PARTS)
        return torch.cat([statistics.flat(parts), host])

    def epoch(self, values: Sequence[float], steps: int, clips: ClipTotals) -> EpochSums:
        """The epoch from the reduced vector's statistics and host facts (:meth:`statistics`), copied to the
        host, and the steps the ranks agree on."""
        layout = self.layout
        n = len(layout.slots)
        length = StatisticsLayout(n).length
        measured, numel, seed_steps, holders, tensors = (
            values[length + i * n : length + (i + 1) * n] for i in range(HOST_FACTS)
        )
        facts = HostFacts(
            layout.slots,
            tuple(m > 0 for m in measured),
            tuple(round(size / max(m, 1.0)) for size, m in zip(numel, measured)),
            {
                slot[0]: round(total / count)
                for slot, total, count in zip(layout.slots, seed_steps, holders)
                if slot[1] == TOTAL and count
            },
            tuple(round(count / max(m, 1.0)) for count, m in zip(tensors, measured)),
        )
        return epoch_sums(facts, values[:length], steps, clips)


class RankReduction:
    """One rank's side of the epoch reduction. Every rank must call :meth:`reduce` at every epoch end,
    and :meth:`stepped` at every sampled step.

    A plain gradient is replicated across the ranks that hold it (DDP), so each rank's own per-step
    statistics of it (sum, largest step, histogram, non-finite steps: ``Segment.stats``) are already
    the global ones: the ranks that measured a slot add theirs and divide by their number, in one
    SUM all-reduce at the epoch end whose size the slots alone fix. A sharded gradient's step norm
    exists only once the ranks' squares are summed, so the per-step squares of the slots holding a
    DTensor shard are summed in chunks (:class:`ShardedChunks`), the last, partial one in the epoch
    end's all-reduce. A slot first sharded this epoch is not in the chunks yet: its rows are kept and
    reduced at the epoch end, once.
    """

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank = rank
        self.world_size = world_size
        self._agreed: SlotLayout | None = None  # agreed lazily, at the first epoch end
        self._contributed: Descriptor | None = None  # what this rank said at the last agreement
        self._chunks = ShardedChunks(())
        self._warned_steps = False

    @classmethod
    def current(cls, export_rank: int) -> RankReduction | None:
        """The reduction for the default process group, or None when ``torch.distributed`` is not in use."""
        group = process_group()
        if group is None:
            return None
        if export_rank >= group[1]:
            raise SettingsError(
                f"export_rank={export_rank} is not valid: expected a rank from 0 to {group[1] - 1} "
                f"(world size {group[1]}; set by {ENV_EXPORT_RANK})"
            )
        return cls(*group)

    def begin(self, segment: Segment) -> None:
        """Agree, as the telemetry is created on every rank, on the slots the first epoch's chunks carry."""
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, tuple(segment.sharded_slots))
        self._chunks = ShardedChunks(tuple(sorted({slot for slots in gathered for slot in slots})))

    def stepped(self, segments: Iterable[Segment], epoch_steps: int, home: torch.device) -> None:
        """A sampled step passed, measured or not (every rank counts it, so every rank runs the same chunks)."""
        self._chunks.stepped(segments, epoch_steps, home)

    @torch.no_grad()
    def reduce(
        self,
        segments: Sequence[Segment] | None,
        steps: int,
        stages: Mapping[str, str],
        listed: Collection[str],
        home: torch.device,
        clips: ClipTotals,
    ) -> tuple[EpochSums, Mapping[str, str], frozenset[str]]:
        """All-reduce the epoch: one collective while no rank's slots or stages changed; when some did,
        a layout exchange and a second all-reduce in the agreed new layout.

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
            _logger.warning(
                "tolaria_otel: rank %d could not measure its epoch; it contributes nothing", self.rank, exc_info=True
            )
            segments, facts = None, None
        self._chunks.wait()
        sharded = () if segments is None or facts is None else _sharded_slots(segments)
        unchunked = set(sharded) - set(self._chunks.slots)
        descriptor: Descriptor = (
            (() if facts is None else facts.slots),
            tuple((seed_id, stage, seed_id in listed) for seed_id, stage in sorted(stages.items())),
            sharded,
            steps if unchunked else 0,
        )
        if self._agreed is None:
            self._agree(descriptor)
        changed = descriptor != self._contributed
        # A changed rank's contribution in the old layout is discarded: it sends only the flag.
        vector, values = self._all_reduce(None if changed else segments, facts, steps, home, changed=changed)
        if values[-1]:  # some rank's layout changed: agree on the new one and reduce again in it
            self._agree(descriptor)
            vector, values = self._all_reduce(segments, facts, steps, home, changed=False)
        self._chunks = ShardedChunks(vector.layout.sharded)  # the next epoch's chunks carry every sharded slot
        tail = self.world_size + 1  # the sampled steps of every rank, then "layout changed"
        sums = vector.epoch(values[:-tail], self._agreed_steps(values[-tail:-1]), clips)
        return sums, vector.layout.stages, vector.layout.left

    def _all_reduce(
        self, segments: Sequence[Segment] | None, facts: HostFacts | None, steps: int, home: torch.device, changed: bool
    ) -> tuple[EpochVector, list[float]]:
        """Reduce, and compute the statistics on the device: the epoch's one host copy (steady state)."""
        assert self._agreed is not None
        vector = EpochVector(self._agreed, self._chunks)
        device = _collective_device(home)
        tail = [0.0] * (self.world_size + 1)  # the sampled steps of every rank, then "layout changed"
        tail[self.rank] = float(steps)
        tail[-1] = float(changed)
        try:
            local = vector.pack(segments, facts, device)
        except Exception:  # telemetry must never stop (or hang) training
            _logger.warning(
                "tolaria_otel: rank %d could not measure its epoch; it contributes nothing", self.rank, exc_info=True
            )
            local = torch.zeros(vector.length, dtype=torch.float32, device=device)
        summed = torch.cat([local, torch.tensor(tail, dtype=torch.float32).to(device)])
        dist.all_reduce(summed)
        return vector, torch.cat([vector.statistics(summed), summed[-(self.world_size + 1) :]]).tolist()

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
            _logger.warning(
                "tolaria_otel: ranks sampled different numbers of steps this epoch (%s); reporting the largest",
                ", ".join(str(int(c)) for c in counts),
            )
        return int(max(counts))


def _sharded_slots(segments: Sequence[Segment]) -> tuple[Slot, ...]:
    """The slots holding a DTensor shard in some segment that sampled steps this epoch."""
    return tuple(sorted({slot for segment in segments if segment.steps for slot in segment.sharded_slots}))


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
