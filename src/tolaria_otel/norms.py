"""The no-grad reduction: per-step gradient norms into device accumulators.

Per sampled optimizer step the only work is, per device, one ``torch._foreach_norm`` over the
gradients and one ``torch._foreach_addcmul_`` of the squared norms into a float32 accumulator per
gradient tensor: no host sync, no Python loop over layers. Squared norms add across steps, and
across ranks when gradients are sharded, which is why the epoch statistic is the root-mean-square
(DESIGN.md). The epoch reduction (``epoch.py``) folds the accumulators into per-layer sums.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

_logger = logging.getLogger(__name__)

#: Gradient dtypes ``torch._foreach_norm(..., dtype=torch.float32)`` accepts; others (float64,
#: complex) are normed in their own precision, then accumulated in float32 all the same.
_FLOAT32_NORMABLE = frozenset({torch.float32, torch.float16, torch.bfloat16})


class GradientHolder(Protocol):
    """What is measured: an ``nn.Parameter``, or a stand-in exposing a DTensor's local shard as ``grad``."""

    @property
    def grad(self) -> torch.Tensor | None: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...


class DeviceMoved(Exception):
    """A measured parameter is no longer on the device its accumulator lives on."""


@dataclass
class _Group:
    """Parameters of one device and one norm kind, measured by the same two foreach ops."""

    device: torch.device
    float32_norm: bool
    params: list[GradientHolder]
    positions: list[int]  # where each parameter sits in GradientSquares' global order
    squares: list[torch.Tensor]  # 0-d views of the accumulator buffer, updated in place
    sparse: list[int] = field(default_factory=list)  # indices (into params) measured one by one


class GradientSquares:
    """Per-parameter sums of squared gradient L2 norms over sampled steps.

    Parameters without a gradient at a step add nothing for that step; which parameters ever had
    one is tracked on the host (``had_gradient``), which costs nothing while every gradient is
    present. A float32 accumulator overflows to ``inf`` once a squared norm passes about 3.4e38:
    such a layer is reported as non-finite, which is where an exploding gradient belongs anyway.
    """

    def __init__(self, params: Sequence[GradientHolder]) -> None:
        self.params = list(params)
        self.steps_all_present = 0  # steps at which every parameter had a gradient
        self._had: list[bool] = [False] * len(params)
        keys: dict[tuple[torch.device, bool], list[int]] = {}
        for position, param in enumerate(params):
            keys.setdefault((param.device, param.dtype in _FLOAT32_NORMABLE), []).append(position)
        self._buffers: list[tuple[torch.Tensor, list[int]]] = []
        self._groups: list[_Group] = []
        for device in dict.fromkeys(device for device, _ in keys):
            positions = [p for (d, _), ps in keys.items() if d == device for p in ps]
            buffer = torch.zeros(len(positions), dtype=torch.float32, device=device)
            self._buffers.append((buffer, positions))
            views = dict(zip(positions, buffer.unbind()))
            for (group_device, float32_norm), group_positions in keys.items():
                if group_device == device:
                    self._groups.append(_Group(device, float32_norm, [params[p] for p in group_positions],
                                               group_positions, [views[p] for p in group_positions]))

    @property
    def home(self) -> torch.device | None:
        return self._buffers[0][0].device if self._buffers else None

    @torch.no_grad()
    def add_step(self) -> None:
        """Queue this step's squared gradient norms onto the device accumulators (no host sync).

        Raises :class:`DeviceMoved` before touching anything when the parameters left their device.
        """
        for group in self._groups:
            if group.params[0].device != group.device:
                raise DeviceMoved(f"{group.device} -> {group.params[0].device}")
        all_present = True
        for group in self._groups:
            all_present &= self._add_group(group)
        self.steps_all_present += all_present

    def _add_group(self, group: _Group) -> bool:
        grads = [param.grad for param in group.params]
        squares = group.squares
        present = None
        # Identity test: `None in grads` would call Tensor.__eq__(None) per gradient (~12 us each).
        if group.sparse or not all(grad is not None for grad in grads):  # frozen or unused parameters this step
            skip = set(group.sparse)
            present = [i for i, grad in enumerate(grads) if grad is not None]
            for i in present:
                self._had[group.positions[i]] = True
            for i in group.sparse:
                if grads[i] is not None:
                    squares[i].add_(_sparse_norm(grads[i]).square())  # type: ignore[arg-type]
            grads = [grads[i] for i in present if i not in skip]
            squares = [squares[i] for i in present if i not in skip]
            if not grads:
                return False
        try:
            self._accumulate(group.float32_norm, grads, squares)  # type: ignore[arg-type]
        except RuntimeError:
            if not self._split_sparse(group, grads):  # type: ignore[arg-type]
                raise
            return self._add_group(group)  # nothing was accumulated: the foreach op failed first
        return present is None or len(present) == len(group.params)

    @staticmethod
    def _accumulate(float32_norm: bool, grads: list[torch.Tensor], squares: list[torch.Tensor]) -> None:
        # Views into one buffer, not a stack of the norms: a third op per step (docs/benchmarks.md).
        if float32_norm:
            norms = torch._foreach_norm(grads, 2, dtype=torch.float32)  # type: ignore[arg-type]
        else:
            norms = torch._foreach_norm(grads, 2)  # type: ignore[arg-type]
        torch._foreach_addcmul_(squares, norms, norms)

    def _split_sparse(self, group: _Group, grads: list[torch.Tensor]) -> bool:
        """Move the parameters whose gradient is sparse to the one-by-one path; False if none is."""
        sparse = [i for i, param in enumerate(group.params)
                  if param.grad is not None and param.grad.layout != torch.strided and i not in group.sparse]
        group.sparse.extend(sparse)
        return bool(sparse)

    def had_gradient(self) -> list[bool]:
        """Per parameter, whether it had a gradient at some step so far."""
        if self.steps_all_present:
            return [True] * len(self.params)
        return list(self._had)

    @torch.no_grad()
    def reset(self) -> None:
        for buffer, _ in self._buffers:
            buffer.zero_()
        self.steps_all_present = 0
        self._had = [False] * len(self.params)

    @torch.no_grad()
    def device_sums(self, home: torch.device) -> torch.Tensor:
        """All sums in parameter order, as one float32 tensor on ``home`` (no host sync)."""
        if len(self._buffers) == 1 and self._buffers[0][0].device == home:
            return self._buffers[0][0]
        sums = torch.zeros(len(self.params), dtype=torch.float32, device=home)
        for buffer, positions in self._buffers:
            index = torch.tensor(positions, dtype=torch.long, device=home)
            sums.index_copy_(0, index, buffer.to(home))
        return sums


def _sparse_norm(grad: torch.Tensor) -> torch.Tensor:
    """L2 norm of a sparse gradient: duplicate indices sum, so coalesce first."""
    values = grad.coalesce().values()
    return torch.linalg.vector_norm(values, dtype=torch.float32 if values.dtype in _FLOAT32_NORMABLE else None).float()


@dataclass(frozen=True)
class SeedPositions:
    """Where a seed's parameters sit in the accumulator: per layer, and once each for the total."""

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
