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
is why the epoch statistic is the root-mean-square (DESIGN.md); keeping them per step gives the
largest step and the distribution too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .gradients import GradientHolder
from .settings import TENSOR_EXPLODING_ABOVE, TENSOR_VANISHING_BELOW

#: Sampled steps whose norms wait on the device before they are batched into slot rows: the step
#: path then costs one foreach op per step (two above LIST_TENSORS_MAX) plus 1/64 of the batch.
FLUSH_EVERY = 64
#: Gradient tensors up to which a step's norms wait as 0-d tensors (FLUSH_EVERY x 64 of them, about 2 MiB
#: at most) and the step is one op; above, they are copied into a buffer of 4 bytes per tensor-step.
LIST_TENSORS_MAX = 64
#: Per slot, the tensor-step counts of Esper's gradient health: below the lower bound, above the upper
#: one (or non-finite).
TENSOR_COUNTS = 2

#: Gradient dtypes ``torch._foreach_norm(..., dtype=torch.float32)`` accepts; others (float64,
#: complex) are normed in their own precision, then converted to float32 with the batch.
_FLOAT32_NORMABLE = frozenset({torch.float32, torch.float16, torch.bfloat16})


class DeviceMoved(Exception):
    """A measured parameter is no longer on the device its group was laid out for."""


@dataclass
class _Group:
    """Parameters of one device and one norm kind, measured by one foreach op per step."""

    device: torch.device
    float32_norm: bool
    params: list[GradientHolder]
    positions: list[int]  # where each parameter sits in StepNorms' order
    missing: torch.Tensor  # the "norm" of a parameter without a gradient this step: -1, which adds 0
    buffer: torch.Tensor | None  # [FLUSH_EVERY, params] waiting norms, above LIST_TENSORS_MAX; else None
    rows: tuple[torch.Tensor, ...] = ()  # the buffer's rows, as views made once (not an indexing op per step)
    sparse: list[int] = field(default_factory=list)  # indices (into params) measured one by one
    pending: list[Sequence[torch.Tensor]] = field(default_factory=list)  # per waiting step (no buffer), its norms


@dataclass
class _DeviceBatch:
    """How one device's waiting norms become slot rows: parameter columns to slots, with weights."""

    groups: list[_Group]
    source: torch.Tensor  # long [entries]: columns of the device's [steps, params] matrix
    target: torch.Tensor  # long [entries]: slots (sharded slots offset by the slot count)
    weights: torch.Tensor | None  # float32 [entries], or None when all are 1
    # The plain (not sharded) entries, whose local norm is the tensor's: what the health counts count.
    count_source: torch.Tensor  # long: columns, on the device
    count_target: torch.Tensor  # long: slots, on the home device


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
        self.slot_count = slot_count
        self.home = home
        self.tensor_bounds = tensor_bounds
        self.sharded = any(weight is not None for _, _, weight in entries)
        self.steps_all_present = 0  # steps at which every parameter had a gradient
        self._had: list[bool] = [False] * len(params)
        self._waiting = 0
        self._missing_waiting = False  # some waiting step lacked a gradient (its placeholder must add 0)
        keys: dict[tuple[torch.device, bool], list[int]] = {}
        for position, param in enumerate(params):
            keys.setdefault((param.device, param.dtype in _FLOAT32_NORMABLE), []).append(position)
        buffered = len(params) > LIST_TENSORS_MAX
        self._groups = []
        for (device, float32_norm), positions in keys.items():
            dtype = torch.float32 if float32_norm else _wide(params[positions[0]])
            buffer = torch.empty(FLUSH_EVERY, len(positions), dtype=dtype, device=device) if buffered else None
            self._groups.append(
                _Group(
                    device,
                    float32_norm,
                    [params[p] for p in positions],
                    positions,
                    torch.full((), -1.0, dtype=dtype, device=device),
                    buffer,
                    buffer.unbind(0) if buffered else (),
                )
            )
        self._batches = []
        for device in dict.fromkeys(group.device for group in self._groups):
            groups = [group for group in self._groups if group.device == device]
            column = {position: i for i, position in enumerate(p for group in groups for p in group.positions)}
            mine = [
                (column[p], slot + (slot_count if weight is not None else 0), weight)
                for p, slot, weight in entries
                if p in column
            ]
            weights = (
                None
                if all(w is None for _, _, w in mine)
                else torch.tensor([1.0 if w is None else w for _, _, w in mine], dtype=torch.float32, device=device)
            )
            plain = [(c, t) for c, t, w in mine if w is None]
            self._batches.append(
                _DeviceBatch(
                    groups,
                    torch.tensor([c for c, _, _ in mine], dtype=torch.long, device=device),
                    torch.tensor([t for _, t, _ in mine], dtype=torch.long, device=device),
                    weights,
                    torch.tensor([c for c, _ in plain], dtype=torch.long, device=device),
                    torch.tensor([t for _, t in plain], dtype=torch.long, device=home),
                )
            )

    def add_step(self, precomputed: Mapping[int, torch.Tensor] | None = None) -> None:
        """Queue this step's gradient norms on the device (no host sync).

        ``precomputed`` maps ``id(parameter)`` to the L2 norm of its gradient this step (a 0-d tensor on
        its device, float32 or wider) when the caller has them already (a clip computes every norm): those
        are taken as they are, a parameter absent from it is one without a gradient.
        Raises :class:`DeviceMoved` before touching anything when the parameters left their device.
        """
        for group in self._groups:
            if group.params[0].device != group.device:
                raise DeviceMoved(f"{group.device} -> {group.params[0].device}")
        # torch.no_grad(), for a gradient that requires grad (backward with create_graph=True), at a
        # third of the decorator's cost on the step path.
        grad_enabled = torch.is_grad_enabled()
        torch.set_grad_enabled(False)
        try:
            all_present = True
            for group in self._groups:
                if precomputed is None or group.sparse:
                    all_present &= self._add_group(group)
                else:
                    all_present &= self._add_precomputed(group, precomputed)
        finally:
            torch.set_grad_enabled(grad_enabled)
        self.steps_all_present += all_present
        self._missing_waiting |= not all_present
        self._waiting += 1

    @property
    def waiting(self) -> int:
        """Sampled steps whose norms wait for :meth:`take_rows`."""
        return self._waiting

    def _add_group(self, group: _Group) -> bool:
        grads = [param.grad for param in group.params]
        if not group.sparse:
            try:
                self._keep(group, self._norms(group.float32_norm, grads))  # type: ignore[arg-type]
                return True
            except TypeError:  # a missing gradient fails the op's argument parsing, before any work
                # Identity test: `None in grads` would call Tensor.__eq__(None) per gradient (~12 us each).
                if all(grad is not None for grad in grads):
                    raise
            except (RuntimeError, NotImplementedError):
                if not self._split_sparse(group):
                    raise
        norms = [group.missing] * len(grads)
        dense = []
        for i, grad in enumerate(grads):
            if grad is None:
                continue
            self._had[group.positions[i]] = True
            if i in group.sparse:
                norms[i] = _sparse_norm(grad).to(group.missing.dtype)
            else:
                dense.append(i)
        try:
            for i, norm in zip(dense, self._norms(group.float32_norm, [grads[i] for i in dense])):  # type: ignore[misc]
                norms[i] = norm
        except (RuntimeError, NotImplementedError):
            if not self._split_sparse(group):
                raise
            return self._add_group(group)  # nothing was queued: the foreach op failed first
        self._keep(group, norms)
        return len(dense) + sum(grads[i] is not None for i in group.sparse) == len(grads)

    def _add_precomputed(self, group: _Group, precomputed: Mapping[int, torch.Tensor]) -> bool:
        norms = [precomputed.get(id(param)) for param in group.params]
        if all(norm is not None for norm in norms):
            self._keep(group, norms)  # type: ignore[arg-type]
            return True
        for i, norm in enumerate(norms):
            if norm is not None:
                self._had[group.positions[i]] = True
        self._keep(group, [group.missing if norm is None else norm for norm in norms])
        return False

    def _keep(self, group: _Group, norms: Sequence[torch.Tensor]) -> None:
        """Keep a step's norms until the batch: as they are, or copied into the group's buffer."""
        if group.buffer is None:
            group.pending.append(norms)
            return
        if self._waiting == len(group.buffer):  # more steps than FLUSH_EVERY without a take_rows(): grow
            group.buffer = torch.cat([group.buffer, torch.empty_like(group.buffer)])
            group.rows = group.buffer.unbind(0)
        torch.stack(norms, out=group.rows[self._waiting])  # type: ignore[arg-type]

    @staticmethod
    def _norms(float32_norm: bool, grads: list[torch.Tensor]) -> Sequence[torch.Tensor]:
        if not grads:
            return ()
        if float32_norm:
            return torch._foreach_norm(grads, 2, dtype=torch.float32)  # type: ignore[arg-type]
        return torch._foreach_norm(grads, 2)  # type: ignore[arg-type]

    @staticmethod
    def _split_sparse(group: _Group) -> bool:
        """Move the parameters whose gradient is sparse to the one-by-one path; False if none is."""
        sparse = [
            i
            for i, param in enumerate(group.params)
            if param.grad is not None and param.grad.layout != torch.strided and i not in group.sparse
        ]
        group.sparse.extend(sparse)
        return bool(sparse)

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
        width = self.slot_count * (2 if self.sharded else 1)
        rows = None
        for batch in self._batches:
            columns = []
            for group in batch.groups:
                if group.buffer is None:
                    norms = torch.stack([norm for step in group.pending for norm in step]).view(
                        steps, len(group.params)
                    )
                    group.pending = []
                else:
                    norms = group.buffer[:steps]
                columns.append(norms if norms.dtype == torch.float32 else norms.float())
            norms = columns[0] if len(columns) == 1 else torch.cat(columns, dim=1)
            if tensor_counts is not None:
                self._count(batch, norms, missing, tensor_counts)
            if missing:
                norms = norms.clamp(min=0.0)  # a missing gradient's -1 adds 0 (NaN stays NaN)
            squares = norms.square()
            picked = squares.index_select(1, batch.source)  # a column per (parameter, slot) pair
            if batch.weights is not None:
                picked = picked * batch.weights
            device_rows = torch.zeros(steps, width, dtype=torch.float32, device=batch.source.device)
            device_rows.index_add_(1, batch.target, picked)
            device_rows = device_rows.to(self.home)
            rows = device_rows if rows is None else rows + device_rows
        return rows

    def _count(self, batch: _DeviceBatch, norms: torch.Tensor, missing: bool, into: torch.Tensor) -> None:
        """Add per slot the tensor-steps below the lower bound and above the upper one (or NaN or Inf): eight
        ops for the batch, on the norms the rows are made of."""
        lower, upper = self.tensor_bounds
        below = norms < lower
        if missing:
            below &= norms >= 0  # not the placeholder of a missing gradient
        above = (norms <= upper).logical_not_()  # NaN compares false: counted, as Esper counts it
        counts = torch.stack([below, above]).sum(1, dtype=torch.float32)  # [TENSOR_COUNTS, params]
        into.index_add_(1, batch.count_target, counts.index_select(1, batch.count_source).to(into.device))

    def had_gradient(self) -> list[bool]:
        """Per parameter, whether it had a gradient at some step so far."""
        if self.steps_all_present:
            return [True] * len(self.params)
        return list(self._had)

    def reset(self) -> None:
        """Forget the epoch: waiting norms and gradient presence."""
        for group in self._groups:
            group.pending = []
        self._waiting = 0
        self._missing_waiting = False
        self.steps_all_present = 0
        self._had = [False] * len(self.params)


def _wide(param: GradientHolder) -> torch.dtype:
    """The dtype ``torch._foreach_norm`` returns for a float64 or complex gradient."""
    return torch.float64 if param.dtype in (torch.float64, torch.complex128) else torch.float32


def _sparse_norm(grad: torch.Tensor) -> torch.Tensor:
    """L2 norm of a sparse gradient: duplicate indices sum, so coalesce first."""
    values = grad.coalesce().values()
    return torch.linalg.vector_norm(values, dtype=torch.float32 if values.dtype in _FLOAT32_NORMABLE else None)


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
