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

from .norms import GradientHolder, GradientSquares, SeedPositions
from .seeds import SeedView, discover_layers
from .settings import ENV_EXPORT_RANK, SettingsError

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch older than 2.5 has it under a private name; a build without distributed has none
    try:
        from torch.distributed._tensor import DTensor
    except ImportError:
        DTensor = None  # type: ignore[assignment,misc]

#: Resource attributes (no semantic convention names the rank; these follow ``torch.distributed``'s own API).
RANK_ATTRIBUTE = "torch.distributed.rank"
WORLD_SIZE_ATTRIBUTE = "torch.distributed.world_size"
#: The layer name of a seed's total in the slot layout; no layer has it (the root is ``(root)``).
TOTAL = ""

Slot = tuple[str, str]
#: What one rank holds: ``(seed_id, stage, layer names)`` per seed, in seed order.
Descriptor = tuple[tuple[str, str, tuple[str, ...]], ...]

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


class LocalShard:
    """A DTensor parameter as :class:`GradientSquares` sees it: its gradient is the local shard.

    A DTensor gradient in ``torch._foreach_norm`` would reduce across ranks at every step; the local
    shard keeps the step path free of collectives.
    """

    __slots__ = ("device", "param")

    def __init__(self, param: nn.Parameter) -> None:
        self.param = param
        self.device = param.device

    @property
    def grad(self) -> torch.Tensor | None:
        grad = self.param.grad
        return None if grad is None else grad.to_local()  # type: ignore[attr-defined]  # a DTensor


def local_gradients(params: Sequence[nn.Parameter]) -> list[GradientHolder]:
    """The parameters to measure: DTensors by their local shard, plain tensors as they are."""
    if DTensor is None:
        return list(params)
    return [LocalShard(param) if isinstance(param, DTensor) else param for param in params]


def shard_weight(param: nn.Parameter) -> float | None:
    """The weight of this rank's squares of a DTensor ``param``, ``1 / replicas``; None for a plain tensor."""
    if DTensor is None or not isinstance(param, DTensor):
        return None
    mesh = param.device_mesh
    return 1.0 / math.prod(mesh.size(dim) for dim, placement in enumerate(param.placements)
                           if not placement.is_shard())


def describe(seeds: Mapping[str, SeedView]) -> Descriptor:
    return tuple((view.seed_id, view.stage, tuple(layer for layer, _ in discover_layers(view).layers))
                 for view in seeds.values())


@dataclass(frozen=True)
class SlotLayout:
    """The slot vector every rank agreed on, and each seed's stage (the lowest rank holding it wins)."""

    slots: tuple[Slot, ...]
    stages: Mapping[str, str]
    positions: tuple[SeedPositions, ...]  # per seed, its layers and total as slot indices

    @classmethod
    def agree(cls, descriptors: Sequence[Descriptor]) -> SlotLayout:
        stages: dict[str, str] = {}
        slots: set[Slot] = set()
        for descriptor in descriptors:  # in rank order
            for seed_id, stage, layers in descriptor:
                stages.setdefault(seed_id, stage)
                slots.add((seed_id, TOTAL))
                slots.update((seed_id, layer) for layer in layers)
        ordered = tuple(sorted(slots))
        index = {slot: i for i, slot in enumerate(ordered)}
        positions = tuple(
            SeedPositions(
                seed_id,
                tuple((layer, (index[(s, layer)],)) for s, layer in ordered if s == seed_id and layer != TOTAL),
                (index[(seed_id, TOTAL)],),
            )
            for seed_id in sorted(stages)
        )
        return cls(ordered, dict(sorted(stages.items())), positions)


@dataclass(frozen=True)
class ReducedEpoch:
    """The global view of one epoch: per-slot squared sums, where each seed sits, stages and steps."""

    sums: list[float]
    positions: tuple[SeedPositions, ...]
    stages: Mapping[str, str]  # the seeds still active somewhere at the epoch end
    steps: int


class RankReduction:
    """One rank's side of the epoch reduction. Every rank must call :meth:`reduce` at every epoch end."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank = rank
        self.world_size = world_size
        self._agreed: SlotLayout | None = None  # agreed lazily, at the first epoch end
        self._descriptor: Descriptor = ()
        self._entries: list[tuple[int, Slot, float | None]] = []  # (parameter position, slot, shard weight)
        self._projection: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
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

    def use_layout(self, seeds: Mapping[str, SeedView], params: Sequence[nn.Parameter],
                   positions: Sequence[SeedPositions]) -> None:
        """What this rank contributes at the end of the epoch that starts now."""
        self._descriptor = describe(seeds)
        weights = [shard_weight(param) for param in params]
        self._entries = []
        for seed in positions:
            for layer, indices in seed.layers:
                self._entries.extend((i, (seed.seed_id, layer), weights[i]) for i in indices)
            self._entries.extend((i, (seed.seed_id, TOTAL), weights[i]) for i in seed.total)
        self._projection = None

    @torch.no_grad()
    def reduce(self, squares: GradientSquares, steps: int, seeds_now: Mapping[str, SeedView]) -> ReducedEpoch:
        """All-reduce the epoch (one collective; a layout exchange too when some rank's seeds changed).

        The local part never raises: a rank that failed to measure still takes part, contributing
        nothing and forcing a fresh layout exchange, so no rank is left waiting in a collective.
        """
        if self._agreed is None:
            self._agreed = self._exchange(self._descriptor)
        layout = self._agreed
        slots = len(layout.slots)
        tail = [0.0] * (self.world_size + 1)  # the sampled steps of every rank, then "layout changed"
        tail[self.rank] = float(steps)
        next_descriptor = self._descriptor
        try:
            local = squares.device_sums()
            vector = self._project(local, layout)
            next_descriptor = describe(seeds_now)
            tail[-1] = float(next_descriptor != self._descriptor)
        except Exception:  # telemetry must never stop (or hang) training
            _logger.warning("tolaria_otel: rank %d could not measure its epoch; it contributes nothing",
                            self.rank, exc_info=True)
            vector = torch.zeros(3 * slots, dtype=torch.float32, device=_collective_device(torch.device("cpu")))
            tail[-1] = 1.0
        vector = torch.cat([vector, torch.tensor(tail, dtype=torch.float32).to(vector.device)])
        dist.all_reduce(vector)
        values = vector.tolist()  # the epoch's one host sync
        sharded, replicated, seen = values[:slots], values[slots:2 * slots], values[2 * slots:3 * slots]
        sums = [s + r / max(n, 1.0) for s, r, n in zip(sharded, replicated, seen)]
        if values[-1]:
            self._agreed = self._exchange(next_descriptor)
        return ReducedEpoch(sums, layout.positions, self._agreed.stages, self._agreed_steps(values[3 * slots:-1]))

    def _project(self, local: torch.Tensor, layout: SlotLayout) -> torch.Tensor:
        """This rank's ``[sharded | replicated | seen]`` slot vector, on the collective's device."""
        device = _collective_device(local.device)
        slots = len(layout.slots)
        if self._projection is None or self._projection[0].device != device:
            index = {slot: i for i, slot in enumerate(layout.slots)}
            entries = [(i, index[slot], weight) if weight is not None else (i, slots + index[slot], 1.0)
                       for i, slot, weight in self._entries if slot in index]
            columns = list(zip(*entries)) if entries else [(), (), ()]
            self._projection = (torch.tensor(columns[0], dtype=torch.long, device=device),
                                torch.tensor(columns[1], dtype=torch.long, device=device),
                                torch.tensor(columns[2], dtype=torch.float32, device=device))
        source, target, weights = self._projection
        vector = torch.zeros(3 * slots, dtype=torch.float32, device=device)
        vector[:2 * slots].index_add_(0, target, local.to(device).index_select(0, source) * weights)
        vector[2 * slots:] = vector[slots:2 * slots] > 0  # this rank saw a gradient there
        return vector

    def _exchange(self, descriptor: Descriptor) -> SlotLayout:
        """Agree on the slot layout: every rank learns what every other rank holds."""
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, descriptor)
        self._projection = None
        return SlotLayout.agree(gathered)

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
