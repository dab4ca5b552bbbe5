"""The no-grad reduction: per-step gradient norms into device buffers, epoch reduction to floats.

Per sampled optimizer step the only work is one ``torch._foreach_norm`` over the gradients and one
in-place multiply-add of the squared norms into a float32 buffer per device: no host sync, no
Python loop over layers. The epoch reduction copies each buffer to the host once. Squared norms add
across steps, and across ranks when gradients are sharded, which is why the epoch statistic is the
root-mean-square (DESIGN.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn


class GradientHolder(Protocol):
    """What is measured: an ``nn.Parameter``, or a stand-in exposing a DTensor's local shard as ``grad``."""

    @property
    def grad(self) -> torch.Tensor | None: ...

    @property
    def device(self) -> torch.device: ...


@dataclass
class _DeviceGroup:
    params: list[GradientHolder]
    positions: list[int]  # where each parameter sits in the accumulator's global order
    squares: torch.Tensor  # float32 [len(params)], sum over sampled steps of ||grad||^2
    index_cache: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict)


class GradientSquares:
    """Per-parameter sums of squared gradient L2 norms over the sampled steps of one epoch.

    Parameters without a gradient at a step add nothing for that step. A float32 buffer overflows
    to ``inf`` once a squared norm passes about 3.4e38 (a norm of about 1.8e19): such a layer is
    reported as non-finite, which is where an exploding gradient belongs anyway.
    """

    def __init__(self, params: Sequence[GradientHolder]) -> None:
        self.size = len(params)
        by_device: dict[torch.device, _DeviceGroup] = {}
        for position, param in enumerate(params):
            group = by_device.get(param.device)
            if group is None:
                squares = torch.zeros(0, dtype=torch.float32, device=param.device)
                group = by_device[param.device] = _DeviceGroup([], [], squares)
            group.params.append(param)
            group.positions.append(position)
        for group in by_device.values():
            group.squares = torch.zeros(len(group.params), dtype=torch.float32, device=group.squares.device)
        self._groups = list(by_device.values())

    @torch.no_grad()
    def add_step(self) -> None:
        """Queue this step's squared gradient norms onto the device buffers (no host sync)."""
        for group in self._groups:
            grads = [param.grad for param in group.params]
            # Identity test: `None in grads` calls Tensor.__eq__(None) per gradient (~12 us each).
            if all(grad is not None for grad in grads):
                norms = torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32))
                group.squares.addcmul_(norms, norms)
                continue
            present = tuple(i for i, grad in enumerate(grads) if grad is not None)
            if not present:
                continue
            index = group.index_cache.get(present)
            if index is None:
                # Built once per distinct pattern of missing gradients (frozen or unused parameters).
                index = torch.tensor(present, dtype=torch.long, device=group.squares.device)
                group.index_cache[present] = index
            norms = torch.stack(torch._foreach_norm([grads[i] for i in present], 2, dtype=torch.float32))
            group.squares.index_add_(0, index, norms * norms)

    @torch.no_grad()
    def device_sums(self) -> torch.Tensor:
        """All sums in global parameter order, as one tensor on the first group's device."""
        if not self._groups:
            return torch.zeros(0, dtype=torch.float32)
        home = self._groups[0].squares.device
        if len(self._groups) == 1:
            return self._groups[0].squares.clone()
        sums = torch.zeros(self.size, dtype=torch.float32, device=home)
        for group in self._groups:
            index = torch.tensor(group.positions, dtype=torch.long, device=home)
            sums.index_copy_(0, index, group.squares.to(home))
        return sums

    @torch.no_grad()
    def reset(self) -> None:
        for group in self._groups:
            group.squares.zero_()


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


def root_mean_square(sums: Sequence[float], positions: Sequence[int], steps: int) -> float:
    """sqrt(mean over steps of the squared L2 norm over the given parameters' gradients)."""
    return (sum(sums[i] for i in positions) / steps) ** 0.5
