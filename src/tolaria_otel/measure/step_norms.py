"""The no-grad reduction: per-step gradient norms, batched on the device.

Per sampled optimizer step the device work is, per device and gradient kind, one
``torch._foreach_norm`` over the gradients. Up to :data:`LIST_TENSORS_MAX` gradient tensors its
results are kept as they are (0-d tensors, about 500 bytes each, :data:`FLUSH_EVERY` steps of them at
most): the step is that one op. Above it, a second op copies them into a preallocated
``[FLUSH_EVERY, tensors]`` buffer (4 bytes per tensor-step), since thousands of waiting 0-d tensors
would hold hundreds of MiB and their stack would stall the flushing step for a second
(docs/benchmarks.md, "Scale"). Every :data:`FLUSH_EVERY` steps one batch of ops turns the waiting
norms into per-slot squared norms per step (``take_rows``): a stack (or a view of the buffer), a
square, and a sum of each slot's parameters; the same batch counts, per slot, the tensor-steps whose
norm was below or above the health thresholds (Esper's gradient health). No host sync, no Python
loop over layers. Squared norms add across steps, and across ranks when gradients are sharded, which
is why the epoch statistic is the root-mean-square (docs/contracts.md); keeping them per step gives the
largest step and the distribution too.

:class:`StepNorms` composes three parts, one per seam: a group of parameters and its step's norms
(``norm_groups.NormGroup``: device, norm kind, dense or sparse), the group's waiting steps
(:class:`GroupQueue`: 0-d tensors or a buffer), and per device the batch that turns them into slot rows
and health counts (:class:`DeviceRows`: columns to slots, shard weights).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..config.settings import TENSOR_EXPLODING_ABOVE, TENSOR_VANISHING_BELOW
from .foreach_norms import NormGroup, norm_groups
from .local_gradients import GradientHolder

#: Sampled steps whose norms wait on the device before they are batched into slot rows: the step
#: path then costs one foreach op per step (two above LIST_TENSORS_MAX) plus 1/64 of the batch.
FLUSH_EVERY = 64
#: Gradient tensors up to which a step's norms wait as 0-d tensors (FLUSH_EVERY x 64 of them, about 2 MiB
#: at most) and the step is one op; above, they are copied into a buffer of 4 bytes per tensor-step.
LIST_TENSORS_MAX = 64
#: Per slot, the tensor-step counts of Esper's gradient health: below the lower bound, above the upper
#: one (or non-finite).
TENSOR_COUNTS = 2


class DeviceMoved(Exception):
    """A measured parameter is no longer on the device its group was laid out for."""


class GroupQueue:
    """One group's norms of the steps waiting for the batch: as they are, 0-d tensors (the step is the
    foreach op alone), or, above :data:`LIST_TENSORS_MAX` parameters, copied into a preallocated
    ``[FLUSH_EVERY, params]`` buffer (one more op, a fixed 4 bytes per tensor-step)."""

    def __init__(self, group: NormGroup, buffered: bool) -> None:
        self.group = group
        self.buffer: torch.Tensor | None = None  # [FLUSH_EVERY, params] waiting norms, when buffered
        self.rows: tuple[torch.Tensor, ...] = ()  # the buffer's rows, as views made once (not an indexing op per step)
        self.pending: list[Sequence[torch.Tensor]] = []  # per waiting step (no buffer), its norms
        if buffered:
            self.buffer = torch.empty(FLUSH_EVERY, len(group.params), dtype=group.missing.dtype, device=group.device)
            self.rows = self.buffer.unbind(0)

    def keep(self, norms: Sequence[torch.Tensor], step: int) -> None:
        """Keep the norms of the ``step``-th waiting step (counted from 0) until the batch."""
        if self.buffer is None:
            self.pending.append(norms)
            return
        if step == len(self.buffer):  # more steps than FLUSH_EVERY without a take_rows(): grow
            self.buffer = torch.cat([self.buffer, torch.empty_like(self.buffer)])
            self.rows = self.buffer.unbind(0)
        torch.stack(norms, out=self.rows[step])  # type: ignore[arg-type]

    def take(self, steps: int) -> torch.Tensor:
        """The ``steps`` waiting steps' norms as float32 ``[steps, params]``, and the queue emptied."""
        if self.buffer is None:
            norms = torch.stack([norm for step in self.pending for norm in step]).view(steps, len(self.group.params))
            self.pending = []
        else:
            norms = self.buffer[:steps]
        return norms if norms.dtype == torch.float32 else norms.float()

    def clear(self) -> None:
        """Forget the waiting steps (a buffer's rows are written over from the first step on)."""
        self.pending = []


class DeviceRows:
    """How one device's waiting norms become slot rows: the columns of its ``[steps, params]`` norms added
    into slots, with weights, and the health counts of its plain parameters.

    ``entries`` are the device's ``(column, slot, shard weight)``: a shard's squares go to the second half of
    the rows (``width`` is twice the slots when some parameter anywhere is a shard), weighted.
    """

    def __init__(
        self,
        queues: list[GroupQueue],
        entries: Sequence[tuple[int, int, float | None]],
        width: int,
        home: torch.device,
        tensor_bounds: tuple[float, float],
    ) -> None:
        self.queues = queues
        self.width = width
        self.home = home
        self.tensor_bounds = tensor_bounds
        device = queues[0].group.device
        self.source = torch.tensor([c for c, _, _ in entries], dtype=torch.long, device=device)
        self.target = torch.tensor([t for _, t, _ in entries], dtype=torch.long, device=device)
        self.weights = (  # float32 [entries], or None when all are 1
            None
            if all(w is None for _, _, w in entries)
            else torch.tensor([1.0 if w is None else w for _, _, w in entries], dtype=torch.float32, device=device)
        )
        # The plain (not sharded) entries, whose local norm is the tensor's: what the health counts count.
        plain = [(c, t) for c, t, w in entries if w is None]
        self.count_source = torch.tensor([c for c, _ in plain], dtype=torch.long, device=device)
        self.count_target = torch.tensor([t for _, t in plain], dtype=torch.long, device=home)
        #: The last taken step's per-tensor norms (a view of the batch's norms: no op), for
        #: :meth:`last_counts` at the epoch end; valid until the next :meth:`take`.
        self.last_norms: torch.Tensor | None = None

    def take(self, steps: int, missing: bool, tensor_counts: torch.Tensor | None) -> torch.Tensor:
        """The waiting steps' ``[steps, width]`` squared norms on ``home``, and their health counts added into
        ``tensor_counts`` when given; ``missing``: some step lacked a gradient, whose placeholder must add 0."""
        columns = [queue.take(steps) for queue in self.queues]
        norms = columns[0] if len(columns) == 1 else torch.cat(columns, dim=1)
        self.last_norms = norms[-1]
        if tensor_counts is not None:
            self._count(norms, missing, tensor_counts)
        if missing:
            norms = norms.clamp(min=0.0)  # a missing gradient's -1 adds 0 (NaN stays NaN)
        squares = norms.square()
        picked = squares.index_select(1, self.source)  # a column per (parameter, slot) pair
        if self.weights is not None:
            picked = picked * self.weights
        rows = torch.zeros(steps, self.width, dtype=torch.float32, device=self.source.device)
        rows.index_add_(1, self.target, picked)
        return rows.to(self.home)

    def last_counts(self, into: torch.Tensor) -> None:
        """Add per slot the last taken step's tensors that had a gradient, and those below and above the
        bounds (``[3, slots]`` on ``home``): the epoch end's, a few ops once per epoch."""
        norms = self.last_norms
        if norms is None:
            return
        lower, upper = self.tensor_bounds
        present = (norms < 0).logical_not_()  # the placeholder of a missing gradient is -1; NaN is present
        below = (norms < lower) & present
        above = (norms <= upper).logical_not_()
        counts = torch.stack([present, below, above]).float()  # [3, params]
        into.index_add_(1, self.count_target, counts.index_select(1, self.count_source).to(into.device))

    def _count(self, norms: torch.Tensor, missing: bool, into: torch.Tensor) -> None:
        """Add per slot the tensor-steps below the lower bound and above the upper one (or NaN or Inf): eight
        ops for the batch, on the norms the rows are made of."""
        lower, upper = self.tensor_bounds
        below = norms < lower
        if missing:
            below &= norms >= 0  # not the placeholder of a missing gradient
        above = (norms <= upper).logical_not_()  # NaN compares false: counted, as Esper counts it
        counts = torch.stack([below, above]).sum(1, dtype=torch.float32)  # [TENSOR_COUNTS, params]
        into.index_add_(1, self.count_target, counts.index_select(1, self.count_source).to(into.device))


def device_rows(
    queues: Sequence[GroupQueue],
    entries: Sequence[tuple[int, int, float | None]],
    slot_count: int,
    sharded: bool,
    home: torch.device,
    tensor_bounds: tuple[float, float],
) -> list[DeviceRows]:
    """Per device, its batch: ``entries`` (``(parameter position, slot, shard weight)``) turned into columns
    of the device's queues, in queue order, and slots (a shard's offset by ``slot_count``)."""
    width = slot_count * (2 if sharded else 1)
    batches = []
    for device in dict.fromkeys(queue.group.device for queue in queues):
        mine = [queue for queue in queues if queue.group.device == device]
        column = {p: i for i, p in enumerate(p for queue in mine for p in queue.group.positions)}
        device_entries = [
            (column[p], slot + (slot_count if weight is not None else 0), weight)
            for p, slot, weight in entries
            if p in column
        ]
        batches.append(DeviceRows(mine, device_entries, width, home, tensor_bounds))
    return batches


class StepNorms:
    """Squared gradient norms per sampled step and slot, for one set of parameters.

    ``entries`` map parameters to slots: ``(parameter position, slot, shard weight)``; a weight of
    None is a plain (replicated) parameter, a float a DTensor shard's ``1 / replicas``, whose
    squares go to the second half of the rows. A parameter without a gradient at a step adds 0;
    which parameters ever had one is tracked on the host (``had_gradient``), at no cost while every
    gradient is present. ``tensor_bounds`` are the health counts' thresholds: a tensor-step counts as
    vanishing below the first, as exploding above the second or when non-finite.
    """

    def __init__(
        self,
        params: Sequence[GradientHolder],
        entries: Sequence[tuple[int, int, float | None]],
        slot_count: int,
        home: torch.device,
        tensor_bounds: tuple[float, float] = (TENSOR_VANISHING_BELOW, TENSOR_EXPLODING_ABOVE),
    ) -> None:
        self.params = list(params)
        self.sharded = any(weight is not None for _, _, weight in entries)
        self.steps_all_present = 0  # steps at which every parameter had a gradient
        self._had: list[bool] = [False] * len(params)
        self._waiting = 0
        self._missing_waiting = False  # some waiting step lacked a gradient (its placeholder must add 0)
        buffered = len(params) > LIST_TENSORS_MAX
        #: Per group of parameters (one device, one norm kind), its queue of waiting steps.
        self._groups = [GroupQueue(group, buffered) for group in norm_groups(params)]
        self._batches = device_rows(self._groups, entries, slot_count, self.sharded, home, tensor_bounds)

    def add_step(self, precomputed: Mapping[int, torch.Tensor] | None = None) -> None:
        """Queue this step's gradient norms on the device (no host sync).

        ``precomputed`` maps ``id(parameter)`` to the L2 norm of its gradient this step (a 0-d tensor on
        its device, float32 or wider) when the caller has them already (a clip computes every norm): those
        are taken as they are, a parameter absent from it is one without a gradient.
        Raises :class:`DeviceMoved` before touching anything when the parameters left their device.
        """
        for queue in self._groups:
            group = queue.group
            if group.params[0].device != group.device:
                raise DeviceMoved(f"{group.device} -> {group.params[0].device}")
        # torch.no_grad(), for a gradient that requires grad (backward with create_graph=True), at a
        # third of the decorator's cost on the step path.
        grad_enabled = torch.is_grad_enabled()
        torch.set_grad_enabled(False)
        try:
            all_present = True
            for queue in self._groups:
                group = queue.group
                if precomputed is None or group.sparse:
                    norms, present = group.measure(self._had)
                else:
                    norms, present = group.given(precomputed, self._had)
                queue.keep(norms, self._waiting)
                all_present &= present
        finally:
            torch.set_grad_enabled(grad_enabled)
        self.steps_all_present += all_present
        self._missing_waiting |= not all_present
        self._waiting += 1

    @property
    def waiting(self) -> int:
        """Sampled steps whose norms wait for :meth:`take_rows`."""
        return self._waiting

    @torch.no_grad()
    def take_rows(self, tensor_counts: torch.Tensor | None = None) -> torch.Tensor | None:
        """The waiting steps as float32 ``[steps, slots]`` squared norms on ``home`` (``[steps, 2 x slots]``
        with the sharded half when some parameter is a DTensor shard), or None when none waits.

        ``tensor_counts`` (float32 ``[TENSOR_COUNTS, slots]`` on ``home``), when given, gets each slot's
        tensor-steps below and above ``tensor_bounds`` added (plain parameters only: a shard's norm is not
        its tensor's)."""
        if not self._waiting:
            return None
        steps, self._waiting = self._waiting, 0
        missing, self._missing_waiting = self._missing_waiting, False
        rows = None
        for batch in self._batches:
            device_rows = batch.take(steps, missing, tensor_counts)
            rows = device_rows if rows is None else rows + device_rows
        return rows

    @torch.no_grad()
    def last_counts(self, slot_count: int, home: torch.device) -> torch.Tensor:
        """float32 ``[3, slot_count]`` on ``home``: per slot, of the last taken step (``take_rows``), the plain
        tensors that had a gradient, and those below and above ``tensor_bounds`` (Esper's ``n``, ``v``, ``e``)."""
        counts = torch.zeros(3, slot_count, dtype=torch.float32, device=home)
        for batch in self._batches:
            batch.last_counts(counts)
        return counts

    def had_gradient(self) -> list[bool]:
        """Per parameter, whether it had a gradient at some step so far."""
        if self.steps_all_present:
            return [True] * len(self.params)
        return list(self._had)

    def reset(self) -> None:
        """Forget the epoch: waiting norms and gradient presence."""
        for queue in self._groups:
            queue.clear()
        self._waiting = 0
        self._missing_waiting = False
        self.steps_all_present = 0
        self._had = [False] * len(self.params)


@dataclass(frozen=True)
class SeedPositions:
    """Where a seed's parameters sit: per layer, and once each for the total."""

    seed_id: str
    layers: tuple[tuple[str, tuple[int, ...]], ...]
    total: tuple[int, ...]


def index_parameters(
    seeds: Sequence[tuple[str, Sequence[tuple[str, Sequence[nn.Parameter]]]]],
) -> tuple[list[nn.Parameter], list[SeedPositions]]:
    """Number every distinct parameter once, so shared ones (tied weights, a parameter shared with
    the host or another seed) are measured once per step and counted in every layer that owns them."""
    params: list[nn.Parameter] = []
    position_of: dict[int, int] = {}
    positions: list[SeedPositions] = []
    for seed_id, layers in seeds:
        layer_positions = []
        for layer, layer_params in layers:
            indices = []
            for param in layer_params:
                if id(param) not in position_of:
                    position_of[id(param)] = len(params)
                    params.append(param)
                indices.append(position_of[id(param)])
            layer_positions.append((layer, tuple(indices)))
        total = tuple(sorted({i for _, indices in layer_positions for i in indices}))
        positions.append(SeedPositions(seed_id, tuple(layer_positions), total))
    return params, positions
