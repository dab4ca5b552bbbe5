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
from typing import Any

import torch
import torch.distributed as dist
from opentelemetry.sdk.resources import Resource
from torch import nn

from .epoch import TOTAL, EpochSums, LocalEpoch, Slot
from .norms import GradientHolder
from .settings import ENV_EXPORT_RANK, SettingsError

#: Resource attributes (no semantic convention names the rank; these follow ``torch.distributed``'s own API).
RANK_ATTRIBUTE = "torch.distributed.rank"
WORLD_SIZE_ATTRIBUTE = "torch.distributed.world_size"
#: What one rank holds: the slots it measured this epoch, and the stages of the seeds listed at its end.
Descriptor = tuple[tuple[Slot, ...], tuple[tuple[str, str], ...]]

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
    """The slot vector every rank agreed on, and each seed's stage (the lowest rank listing it wins)."""

    slots: tuple[Slot, ...]
    stages: Mapping[str, str]

    @classmethod
    def agree(cls, descriptors: Sequence[Descriptor]) -> SlotLayout:
        stages: dict[str, str] = {}
        slots: set[Slot] = set()
        for rank_slots, rank_stages in descriptors:  # in rank order
            slots.update(rank_slots)
            for seed_id, stage in rank_stages:
                stages.setdefault(seed_id, stage)
        return cls(tuple(sorted(slots)), dict(sorted(stages.items())))


#: Sections of the reduced vector, each one slot long: squares of sharded (DTensor) gradients,
#: squares of plain gradients, ranks that measured the slot, and, at a seed's TOTAL slot, the sum of
#: its sampled steps over the ranks that listed it and how many ranks those were.
_SHARDED, _REPLICATED, _MEASURED, _SEED_STEPS, _HOLDERS = range(5)
_SECTIONS = 5


class RankReduction:
    """One rank's side of the epoch reduction. Every rank must call :meth:`reduce` at every epoch end."""

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
    def reduce(self, local: LocalEpoch | None, steps: int,
               stages: Mapping[str, str]) -> tuple[EpochSums, Mapping[str, str]]:
        """All-reduce the epoch: one collective while no rank's slots or stages changed; when some did,
        a layout exchange and a second all-reduce in the agreed new layout.

        ``local`` is None on a rank that failed to measure: it still takes part, contributing
        nothing, so no rank is left waiting in a collective.
        """
        descriptor: Descriptor = ((() if local is None else local.slots), tuple(sorted(stages.items())))
        if self._agreed is None:
            self._agree(descriptor)
        assert self._agreed is not None
        values = self._all_reduce(local, steps, changed=descriptor != self._contributed)
        if values[-1]:  # some rank's layout changed: agree on the new one and reduce again in it
            self._agree(descriptor)
            values = self._all_reduce(local, steps, changed=False)
        layout = self._agreed
        n = len(layout.slots)
        section = [values[i * n:(i + 1) * n] for i in range(_SECTIONS)]
        sums = [s + r / max(m, 1.0) for s, r, m in
                zip(section[_SHARDED], section[_REPLICATED], section[_MEASURED])]
        seed_steps = {seed_id: round(total / holders) for (seed_id, layer), total, holders in
                      zip(layout.slots, section[_SEED_STEPS], section[_HOLDERS]) if layer == TOTAL and holders}
        measured = [m > 0 for m in section[_MEASURED]]
        epoch = EpochSums(layout.slots, sums, measured, seed_steps,
                          self._agreed_steps(values[_SECTIONS * n:-1]))
        return epoch, layout.stages

    def _all_reduce(self, local: LocalEpoch | None, steps: int, changed: bool) -> list[float]:
        assert self._agreed is not None
        tail = [0.0] * (self.world_size + 1)  # the sampled steps of every rank, then "layout changed"
        tail[self.rank] = float(steps)
        tail[-1] = float(changed)
        try:
            vector = self._project(local, self._agreed)
        except Exception:  # telemetry must never stop (or hang) training
            _logger.warning("tolaria_otel: rank %d could not measure its epoch; it contributes nothing",
                            self.rank, exc_info=True)
            vector = torch.zeros(_SECTIONS * len(self._agreed.slots), dtype=torch.float32,
                                 device=_collective_device(torch.device("cpu")))
        vector = torch.cat([vector, torch.tensor(tail, dtype=torch.float32).to(vector.device)])
        dist.all_reduce(vector)
        return vector.tolist()  # the epoch's one host sync (two when the layout changed)

    def _project(self, local: LocalEpoch | None, layout: SlotLayout) -> torch.Tensor:
        """This rank's sections in the agreed slot order, on the collective's device."""
        n = len(layout.slots)
        device = _collective_device(torch.device("cpu") if local is None else local.vector.device)
        vector = torch.zeros(_SECTIONS * n, dtype=torch.float32, device=device)
        if local is None or not local.slots:
            return vector
        index = {slot: i for i, slot in enumerate(layout.slots)}
        known = [i for i, slot in enumerate(local.slots) if slot in index]
        target = [index[local.slots[i]] for i in known]
        m = len(local.slots)
        source = torch.tensor(known + [m + i for i in known], dtype=torch.long, device=device)
        squares = local.vector.to(device).index_select(0, source)
        vector.index_copy_(0, torch.tensor(target + [n + t for t in target], dtype=torch.long, device=device),
                           squares)
        host = [0.0] * (3 * n)  # measured, seed steps, holders: host facts, copied to the device once
        for i, t in zip(known, target):
            seed_id, layer = local.slots[i]
            host[t] = float(local.measured[i])
            if layer == TOTAL and seed_id in local.seed_steps:
                host[n + t] = float(local.seed_steps[seed_id])
                host[2 * n + t] = 1.0
        vector[2 * n:] = torch.tensor(host, dtype=torch.float32).to(device)
        return vector

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
