"""One epoch's measurement as seeds come and go: segments of steps, folded into per-slot statistics.

A *segment* is the measured parameters of one set of seed modules and the sampled steps during
which that set was the one the seed source listed. A seed germinated or culled mid-epoch, a module
swapped under the same seed id or a model moved to another device starts a new segment; the
earlier ones keep what they measured, folded in at the epoch end, so no sampled step is lost and a
seed's values cover exactly the steps at which it was present. A steady run has one segment per
epoch, reused from epoch to epoch.

A *slot* is ``(seed_id, layer)`` or ``(seed_id, TOTAL)`` (``(HOST, TOTAL)`` for the host when it is
measured). Per slot, over the epoch's sampled steps, the statistics are: the sum of the per-step
squared norms (the RMS), the largest per-step squared norm (the spike), and how many steps were
non-finite; per seed total, the per-step norms' histogram over ``config.histogram.HISTOGRAM_BOUNDARIES``; per
slot, the tensor-steps below and above the health thresholds (``step_norms.TENSOR_COUNTS``); laid out by
``statistics.StatisticsLayout``. They are computed on the device from the per-step norms
(``step_norms.StepNorms``) and copied to the host once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..capture.torch_clip import l2_norms
from ..config.settings import TENSOR_EXPLODING_ABOVE, TENSOR_VANISHING_BELOW
from .local_gradients import local_gradients, shard_weight
from .seeds import SeedView, discover_layers
from .statistics import StatisticsLayout, bucket_bounds, slot_statistics
from .step_norms import FLUSH_EVERY, StepNorms, index_parameters

#: The layer name of a seed's total; no layer has it (the root is ``(root)``).
TOTAL = ""
#: The seed id of the host (every trainable parameter of the model that belongs to no seed); no seed has it.
HOST = ""

Slot = tuple[str, str]
#: Rows of ``Segment.last_step``: the last step's squared norm, then its tensor counts (present, below, above).
LAST_STEP_ROWS = 4
SegmentKey = tuple[object, ...]


def segment_key(seeds: Mapping[str, SeedView], host: Sequence[nn.Parameter] = ()) -> SegmentKey:
    """What a segment's layout depends on: each seed's parameters, whether they train, and where.

    Parameter ids cannot be reused while a segment holds the parameters.
    """
    key = tuple(
        (seed_id, tuple((id(p), p.requires_grad, p.device) for p in module_parameters(view.module)))
        for seed_id, view in seeds.items()
    )
    return (*key, (HOST, tuple((id(p), p.device) for p in host))) if host else key


def module_parameters(module: nn.Module) -> list[nn.Parameter]:
    """``list(module.parameters())``, same order, in half the time: the epoch end walks every seed with it."""
    params: list[nn.Parameter] = []
    seen: set[int] = set()  # parameters and modules: a shared one counts once, as in torch
    stack = [module]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        for param in current._parameters.values():
            if param is not None and id(param) not in seen:
                seen.add(id(param))
                params.append(param)
        stack.extend(child for child in reversed(current._modules.values()) if child is not None)
    return params


class SlotStats:
    """Running per-slot statistics of a single process's steps, on the device, in one flat vector
    (``statistics.StatisticsLayout``) so the epoch end copies it to the host as it is. The health counts
    are float32: exact up to 2**24 tensor-steps per slot."""

    def __init__(self, slot_count: int, device: torch.device) -> None:
        self.layout = StatisticsLayout(slot_count)
        self.values = self.layout.zeros(device)
        self.parts = self.layout.views(self.values)
        #: ``[TENSOR_COUNTS, slots]``: added at every batch, single process or not (``StepNorms.take_rows``).
        self.tensors = self.parts["tensors"]
        self.bounds = bucket_bounds(device)

    @torch.no_grad()
    def update(self, rows: torch.Tensor, first: int) -> None:
        """Add ``[steps, slots]`` squared norms of the consecutive sampled steps from index ``first`` (a
        batch of ops for the whole batch of steps)."""
        self.layout.add(self.parts, slot_statistics(rows, self.bounds, first))


class Segment:
    """The measured parameters of one set of seed modules, and the sampled steps it was current."""

    def __init__(
        self,
        seeds: Mapping[str, SeedView],
        key: SegmentKey,
        *,
        host: Sequence[nn.Parameter] = (),
        keep_rows: bool = False,
        tensor_bounds: tuple[float, float] = (TENSOR_VANISHING_BELOW, TENSOR_EXPLODING_ABOVE),
    ) -> None:
        self.key = key
        self.modules: dict[str, nn.Module] = {seed_id: view.module for seed_id, view in seeds.items()}
        layouts = [(view.seed_id, discover_layers(view).layers) for view in seeds.values()]
        if host:
            layouts.append((HOST, (("host", tuple(host)),)))
        params, positions = index_parameters(layouts)
        slot_indices: dict[Slot, tuple[int, ...]] = {}
        for seed in positions:
            layers = () if seed.seed_id == HOST else seed.layers
            for layer, indices in (*layers, (TOTAL, seed.total)):
                slot_indices[(seed.seed_id, layer)] = indices
        #: Sorted: the order of every epoch's statistics, so a lone segment's are copied out as they are.
        self.slots: list[Slot] = sorted(slot_indices)
        self.slot_params = [slot_indices[slot] for slot in self.slots]
        weights = [shard_weight(param) for param in params]
        entries = [(i, slot, weights[i]) for slot, indices in enumerate(self.slot_params) for i in indices]
        self.numel = [param.numel() for param in params]
        self.slot_numel = [sum(self.numel[i] for i in indices) for indices in self.slot_params]
        self.seed_ids = {seed for seed, _ in self.slots}
        self.measured_parameters = {id(param) for param in params}
        self.home = params[0].device if params else torch.device("cpu")
        self.norms = StepNorms(local_gradients(params), entries, len(self.slots), self.home, tensor_bounds)
        self._parameter_ids = [id(holder) for holder in self.norms.params]
        self.steps = 0
        # Each batch of rows is folded into running statistics (memory independent of the epoch's
        # length): the local steps of a plain gradient are its global ones (one process, or replicated
        # by DDP). Under torch.distributed the rows of the slots holding a DTensor shard are kept too
        # (``keep_rows``): a spike or a bucket of a sharded gradient exists only after the ranks'
        # squares are summed per step (``distributed.RankReduction``).
        sharded = sorted({slot for _, slot, weight in entries if weight is not None})
        #: Slots with a sharded parameter, and their columns in the rows.
        self.sharded_slots: list[Slot] = [self.slots[slot] for slot in sharded]
        self.keep_rows = keep_rows and bool(sharded)
        self._sharded_columns = torch.tensor(sharded, dtype=torch.long, device=self.home) if self.keep_rows else None
        #: (epoch step indices, ``[steps, 2 x sharded slots]``: their plain squares, then their shards')
        self.rows: list[tuple[list[int], torch.Tensor]] = []
        self._row_steps: list[int] = []
        #: The epoch step index of the first waiting step, and the one a step continuing their run has.
        self._first_waiting = 0
        self._next_step = 0
        #: The last absorbed step's squared norms per slot (a view of its batch's rows: no op), for the epoch end.
        self._last_row: torch.Tensor | None = None
        self.stats = SlotStats(len(self.slots), self.home)
        #: The owner of each distinct clip parameter set seen (``clip_owner``), and parameter id -> seed.
        self._clip_owners: dict[tuple[int, int, int], str | None] = {}
        self._seed_of: dict[int, str] | None = None

    def clip_owner(self, parameters: Mapping[int, object] | None) -> str | None:
        """The seed a clip belongs to: the one that holds all of its parameters (those that had a gradient,
        by id); None, the trainer's, for any other clip (the host's, several seeds', the whole model's, or
        parameters not known). O(1) per clip: cached per parameter set, keyed by its first and last id and
        its size (ids are not reused while this segment holds its parameters)."""
        if not parameters:
            return None
        ids = parameters.keys()
        key = (next(iter(ids)), next(reversed(ids)), len(ids))  # type: ignore[call-overload]  # a dict's keys
        try:
            return self._clip_owners[key]
        except KeyError:
            pass
        if self._seed_of is None:
            self._seed_of = {
                self._parameter_ids[i]: seed
                for (seed, layer), indices in zip(self.slots, self.slot_params)
                if layer == TOTAL and seed != HOST
                for i in indices
            }
        owners = {self._seed_of.get(i) for i in ids}
        owner = owners.pop() if len(owners) == 1 else None
        self._clip_owners[key] = owner
        return owner

    def lists_same_modules(self, mapping: Mapping[str, tuple[nn.Module, object]]) -> bool:
        """The step path's check: the same seed ids with the same module objects (no walk over modules)."""
        modules = self.modules
        if len(mapping) != len(modules):
            return False
        for seed_id, entry in mapping.items():  # noqa: SIM110 - the step path: a plain loop, no generator frame
            if modules.get(seed_id) is not entry[0]:
                return False
        return True

    def add_step(self, epoch_step: int, staged: Mapping[int, torch.Tensor] | None = None) -> None:
        """Queue a sampled step: measured here, or from the norms a clip took before it scaled (``staged``, by
        parameter id), completed for the parameters it did not cover (still unclipped now). Every
        ``FLUSH_EVERY`` steps the waiting norms are folded into the running statistics, and before a step
        that does not follow them (the segment was not current in between): a batch's largest step is
        its index in the batch plus its first step's, so the waiting steps are one run of indices."""
        if self.norms.waiting and epoch_step != self._next_step:
            self.absorb()
        self.norms.add_step(None if staged is None else self._completed(staged))
        if self.norms.waiting == 1:
            self._first_waiting = epoch_step
        self._next_step = epoch_step + 1
        self.steps += 1
        if self.keep_rows:
            self._row_steps.append(epoch_step)
        if self.norms.waiting >= FLUSH_EVERY:
            self.absorb()

    def _completed(self, staged: Mapping[int, torch.Tensor]) -> Mapping[int, torch.Tensor]:
        if all(map(staged.__contains__, self._parameter_ids)):
            return staged
        missing = [
            (key, holder.grad)
            for key, holder in zip(self._parameter_ids, self.norms.params)
            if key not in staged and holder.grad is not None
        ]
        if not missing:
            return staged
        measured, order = l2_norms([grad for _, grad in missing])
        return {**staged, **{missing[i][0]: norm for i, norm in zip(order, measured)}}

    def absorb(self) -> None:
        """Turn the waiting steps into rows and fold their plain squares in; keep the sharded slots' rows."""
        rows = self.norms.take_rows(self.stats.tensors)
        if rows is None:
            return
        n = len(self.slots)
        self._last_row = rows[-1, :n]
        self.stats.update(rows[:, :n].contiguous() if self.norms.sharded else rows, self._first_waiting)
        if self._sharded_columns is not None:
            columns = self._sharded_columns
            self.rows.append(
                (self._row_steps, torch.cat([rows.index_select(1, columns), rows.index_select(1, columns + n)], dim=1))
            )
            self._row_steps = []

    @property
    def last_index(self) -> int:
        """The epoch's sampled index of this segment's last step (meaningful while ``steps``)."""
        return self._next_step - 1

    def last_step(self) -> torch.Tensor:
        """float32 ``[LAST_STEP_ROWS, slots]`` on ``home``, of the segment's last step (absorbed): per slot its
        squared norm, its plain tensors that had a gradient, and those below and above the health bounds.
        A few ops at the epoch end; the step path adds none (the row and the norms are views it kept)."""
        counts = self.norms.last_counts(len(self.slots), self.home)
        row = self._last_row
        if row is None:
            row = torch.zeros(len(self.slots), dtype=torch.float32, device=self.home)
        return torch.cat([row.unsqueeze(0), counts])

    def reset(self) -> None:
        self.norms.reset()
        self.steps = 0
        self.rows = []
        self._row_steps = []
        self.stats.values.zero_()
