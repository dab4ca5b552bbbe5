"""One step's gradient norms of a group of parameters: one device, one norm kind, one foreach op.

``torch._foreach_norm`` takes tensors of one device, and norms float32, float16 and bfloat16 gradients in
float32 (``dtype=torch.float32``) but float64 and complex ones only in their own precision, so the
parameters are grouped by both (:func:`norm_groups`). A group whose gradients are all present and dense
costs that one op per step; a missing gradient or a sparse one sends it to the one-by-one path, where a
missing gradient's norm is the group's placeholder, -1 (the batch turns it into 0), and a sparse gradient
is normed on its own. Which parameters ever had a gradient is written into the caller's list on the slow
path only: while every gradient is present the caller counts whole steps instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .local_gradients import GradientHolder

#: Gradient dtypes ``torch._foreach_norm(..., dtype=torch.float32)`` accepts; others (float64,
#: complex) are normed in their own precision, then converted to float32 with the batch.
_FLOAT32_NORMABLE = frozenset({torch.float32, torch.float16, torch.bfloat16})


@dataclass
class NormGroup:
    """Parameters of one device and one norm kind, measured by one foreach op per step."""

    device: torch.device
    float32_norm: bool
    params: list[GradientHolder]
    positions: list[int]  # where each parameter sits in the caller's order
    missing: torch.Tensor  # the "norm" of a parameter without a gradient this step: -1, which adds 0
    sparse: list[int] = field(default_factory=list)  # indices (into params) measured one by one

    def measure(self, had: list[bool]) -> tuple[Sequence[torch.Tensor], bool]:
        """This step's norms, one per parameter, and whether every parameter had a gradient; ``had`` gets
        the parameters that did when some did not."""
        grads = [param.grad for param in self.params]
        if not self.sparse:
            try:
                return self._foreach(grads), True  # type: ignore[arg-type]
            except TypeError:  # a missing gradient fails the op's argument parsing, before any work
                # Identity test: `None in grads` would call Tensor.__eq__(None) per gradient (~12 us each).
                if all(grad is not None for grad in grads):
                    raise
            except (RuntimeError, NotImplementedError):
                if not self._split_sparse():
                    raise
        norms = [self.missing] * len(grads)
        dense = []
        for i, grad in enumerate(grads):
            if grad is None:
                continue
            had[self.positions[i]] = True
            if i in self.sparse:
                norms[i] = _sparse_norm(grad).to(self.missing.dtype)
            else:
                dense.append(i)
        try:
            for i, norm in zip(dense, self._foreach([grads[i] for i in dense])):  # type: ignore[misc]
                norms[i] = norm
        except (RuntimeError, NotImplementedError):
            if not self._split_sparse():
                raise
            return self.measure(had)  # nothing was kept: the foreach op failed first
        return norms, len(dense) + sum(grads[i] is not None for i in self.sparse) == len(grads)

    def given(self, precomputed: Mapping[int, torch.Tensor], had: list[bool]) -> tuple[Sequence[torch.Tensor], bool]:
        """As :meth:`measure`, from norms the caller computed (``id(parameter)`` -> its gradient's norm; a
        parameter absent from it had no gradient)."""
        norms = [precomputed.get(id(param)) for param in self.params]
        if all(norm is not None for norm in norms):
            return norms, True  # type: ignore[return-value]
        for i, norm in enumerate(norms):
            if norm is not None:
                had[self.positions[i]] = True
        return [self.missing if norm is None else norm for norm in norms], False

    def _foreach(self, grads: list[torch.Tensor]) -> Sequence[torch.Tensor]:
        if not grads:
            return ()
        if self.float32_norm:
            return torch._foreach_norm(grads, 2, dtype=torch.float32)
        return torch._foreach_norm(grads, 2)

    def _split_sparse(self) -> bool:
        """Move the parameters whose gradient is sparse to the one-by-one path; False if none is."""
        sparse = [
            i
            for i, param in enumerate(self.params)
            if param.grad is not None and param.grad.layout != torch.strided and i not in self.sparse
        ]
        self.sparse.extend(sparse)
        return bool(sparse)


def norm_groups(params: Sequence[GradientHolder]) -> list[NormGroup]:
    """The parameters grouped by device and norm kind, in order of first appearance."""
    keys: dict[tuple[torch.device, bool], list[int]] = {}
    for position, param in enumerate(params):
        keys.setdefault((param.device, param.dtype in _FLOAT32_NORMABLE), []).append(position)
    return [
        NormGroup(
            device,
            float32_norm,
            [params[p] for p in positions],
            positions,
            torch.full((), -1.0, dtype=torch.float32 if float32_norm else _wide(params[positions[0]]), device=device),
        )
        for (device, float32_norm), positions in keys.items()
    ]


def _wide(param: GradientHolder) -> torch.dtype:
    """The dtype ``torch._foreach_norm`` returns for a float64 or complex gradient."""
    return torch.float64 if param.dtype in (torch.float64, torch.complex128) else torch.float32


def _sparse_norm(grad: torch.Tensor) -> torch.Tensor:
    """L2 norm of a sparse gradient: duplicate indices sum, so coalesce first."""
    values = grad.coalesce().values()
    norm: torch.Tensor = torch.linalg.vector_norm(
        values, dtype=torch.float32 if values.dtype in _FLOAT32_NORMABLE else None
    )
    return norm
