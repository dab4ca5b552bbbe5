"""The no-grad reduction: per-step gradient norms into device accumulators, epoch reduction to floats.

Per sampled optimizer step the only work is one ``torch._foreach_norm`` over the gradients and one
``torch._foreach_addcmul_`` of the squared norms into a float32 accumulator per gradient tensor (on
its device): no host sync, no Python loop over layers. The epoch reduction stacks the accumulators
and copies them to the host once. Squared norms add across steps, and across ranks when gradients
are sharded, which is why the epoch statistic is the root-mean-square (DESIGN.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
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
    buffer: torch.Tensor  # float32 [len(params)]: sum over sampled steps of ||grad||^2
    squares: list[torch.Tensor]  # the buffer's elements, as views the foreach ops update


class GradientSquares:
    """Per-parameter sums of squared gradient L2 norms over the sampled steps of one epoch.

    Parameters without a gradient at a step add nothing for that step. A float32 accumulator
    overflows to ``inf`` once a squared norm passes about 3.4e38 (a norm of about 1.8e19): such a
    layer is reported as non-finite, which is where an exploding gradient belongs anyway.
    """

    def __init__(self, params: Sequence[GradientHolder]) -> None:
        self.size = len(params)
        positions: dict[torch.device, list[int]] = {}
        for position, param in enumerate(params):
            positions.setdefault(param.device, []).append(position)
        self._groups = []
        for device, indices in positions.items():
            buffer = torch.zeros(len(indices), dtype=torch.float32, device=device)
            self._groups.append(_DeviceGroup([params[i] for i in indices], indices, buffer, list(buffer.unbind())))

    @torch.no_grad()
    def add_step(self) -> None:
        """Queue this step's squared gradient norms onto the device accumulators (no host sync)."""
        for group in self._groups:
            grads = [param.grad for param in group.params]
            squares = group.squares
            # Identity test: `None in grads` would call Tensor.__eq__(None) per gradient (~12 us each).
            if not all(grad is not None for grad in grads):  # frozen or unused parameters this step
                present = [i for i, grad in enumerate(grads) if grad is not None]
                grads = [grads[i] for i in present]
                squares = [squares[i] for i in present]
                if not grads:
                    continue
            # Views into one buffer, not a stack of the norms: a third op per step (docs/benchmarks.md).
            norms = torch._foreach_norm(grads, 2, dtype=torch.float32)  # type: ignore[arg-type]
            torch._foreach_addcmul_(squares, norms, norms)

    @torch.no_grad()
    def reset(self) -> None:
        for group in self._groups:
            group.buffer.zero_()

    @torch.no_grad()
    def device_sums(self) -> torch.Tensor:
        """All sums in global parameter order, as one tensor on the first group's device."""
        if not self._groups:
            return torch.zeros(0, dtype=torch.float32)
        if len(self._groups) == 1:
            return self._groups[0].buffer.clone()
        home = self._groups[0].buffer.device
        sums = torch.zeros(self.size, dtype=torch.float32, device=home)
        for group in self._groups:
            index = torch.tensor(group.positions, dtype=torch.long, device=home)
            sums.index_copy_(0, index, group.buffer.to(home))
        return sums


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
