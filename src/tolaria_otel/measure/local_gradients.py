"""What is measured of a parameter: its gradient as this process holds it.

Below the step path (``norms``), the epoch (``epoch``) and the ranks' reduction (``distributed``), which all
need to know whether a parameter is a ``DTensor`` and which gradient of it to measure. A ``DTensor``
(FSDP2 ``fully_shard``, HSDP, tensor parallel) is measured on its local shard, and its squares are
weighted by ``1 / replicas`` so that the ranks' sums add up to the whole gradient's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, cast

import torch
import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor


class GradientHolder(Protocol):
    """What is measured: an ``nn.Parameter``, or a stand-in exposing a DTensor's local shard as ``grad``."""

    @property
    def grad(self) -> torch.Tensor | None: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...


def _dtensor_type() -> type | None:
    """The DTensor class, imported only under torch.distributed (its import costs about a second)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None  # a DTensor needs a process group: without one, no parameter can be one
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch older than 2.5 has it under a private name
        from torch.distributed._tensor import DTensor  # type: ignore[attr-defined]  # not re-exported
    return DTensor


class LocalShard:
    """A DTensor parameter as the step path sees it: its gradient is the local shard.

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
    shard = cast("DTensor", param)
    replicas: int = math.prod(
        shard.device_mesh.size(dim) for dim, placement in enumerate(shard.placements) if not placement.is_shard()
    )
    return 1.0 / replicas
