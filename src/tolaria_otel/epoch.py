"""One epoch's measurement as seeds come and go: segments of steps, folded into per-layer sums.

A *segment* is the measured parameters of one set of seed modules and the sampled steps during
which that set was the one the seed source listed. A seed germinated or culled mid-epoch, a module
swapped under the same seed id or a model moved to another device starts a new segment; the
accumulators of the earlier ones stay on the device and are folded in at the epoch end, so no
sampled step is lost and a seed's value covers exactly the steps at which it was present. A steady
run has one segment per epoch, reused (zeroed) from epoch to epoch.

The fold gives one vector of *slots*, ``(seed_id, layer)`` and ``(seed_id, TOTAL)``, on the device:
the single host copy of the epoch (or the input of the one all-reduce, ``distributed.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .norms import GradientSquares, SeedPositions, index_parameters
from .seeds import SeedView, discover_layers

#: The layer name of a seed's total in the slot layout; no layer has it (the root is ``(root)``).
TOTAL = ""

Slot = tuple[str, str]
SegmentKey = tuple[object, ...]


def segment_key(seeds: Mapping[str, SeedView]) -> SegmentKey:
    """What a segment's layout depends on: each seed's parameters, whether they train, and where.

    Parameter ids cannot be reused while a segment holds the parameters.
    """
    return tuple((seed_id, tuple((id(p), p.requires_grad, p.device) for p in view.module.parameters()))
                 for seed_id, view in seeds.items())


class Segment:
    """The measured parameters of one set of seed modules, and the sampled steps it was current."""

    def __init__(self, seeds: Mapping[str, SeedView], key: SegmentKey) -> None:
        from .distributed import local_gradients, shard_weight  # DTensor support, loaded only when needed

        self.key = key
        self.modules: dict[str, nn.Module] = {seed_id: view.module for seed_id, view in seeds.items()}
        layouts = [discover_layers(view) for view in seeds.values()]
        params, self.positions = index_parameters([(layout.seed_id, layout.layers) for layout in layouts])
        self.shard_weights: list[float | None] = [shard_weight(param) for param in params]
        self.squares = GradientSquares(local_gradients(params))
        self.steps = 0

    def lists_same_modules(self, mapping: Mapping[str, tuple[nn.Module, object]]) -> bool:
        """The step path's check: the same seed ids with the same module objects (no walk over modules)."""
        modules = self.modules
        if len(mapping) != len(modules):
            return False
        for seed_id, entry in mapping.items():
            if modules.get(seed_id) is not entry[0]:
                return False
        return True

    def reset(self) -> None:
        self.squares.reset()
        self.steps = 0


@dataclass(frozen=True)
class LocalEpoch:
    """This process's epoch, per slot: squared sums on the device, the rest on the host."""

    slots: tuple[Slot, ...]  # sorted
    vector: torch.Tensor  # float32 [2 * len(slots)]: sharded sums, then replicated (plain) sums
    measured: tuple[bool, ...]  # per slot: some parameter of it had a gradient at some step
    seed_steps: Mapping[str, int]  # per seed: the sampled steps at which it was listed


@torch.no_grad()
def fold(segments: Sequence[Segment], home: torch.device) -> LocalEpoch:
    """Sum the segments' per-parameter accumulators into slots, on ``home`` (no host sync).

    A DTensor parameter's squares go to the sharded half, weighted ``1 / replicas``; a plain
    parameter's to the replicated half (``distributed.py`` says why they differ across ranks).
    """
    seed_steps: dict[str, int] = {}
    entries: list[tuple[Segment, list[tuple[int, Slot]]]] = []
    for segment in segments:
        if not segment.steps:
            continue
        pairs = []
        for seed in segment.positions:
            seed_steps[seed.seed_id] = seed_steps.get(seed.seed_id, 0) + segment.steps
            for layer, indices in seed.layers:
                pairs.extend((i, (seed.seed_id, layer)) for i in indices)
            pairs.extend((i, (seed.seed_id, TOTAL)) for i in seed.total)
        entries.append((segment, pairs))
    slots = tuple(sorted({slot for _, pairs in entries for _, slot in pairs} | {(s, TOTAL) for s in seed_steps}))
    index = {slot: i for i, slot in enumerate(slots)}
    vector = torch.zeros(2 * len(slots), dtype=torch.float32, device=home)
    measured = [False] * len(slots)
    for segment, pairs in entries:
        had = segment.squares.had_gradient()
        source, target, weights = [], [], []
        for i, slot in pairs:
            weight = segment.shard_weights[i]
            source.append(i)
            target.append(index[slot] if weight is not None else len(slots) + index[slot])
            weights.append(1.0 if weight is None else weight)
            measured[index[slot]] |= had[i]
        if not source:
            continue
        sums = segment.squares.device_sums(home).index_select(0, torch.tensor(source, device=home))
        if any(weight != 1.0 for weight in weights):
            sums = sums * torch.tensor(weights, dtype=torch.float32, device=home)
        vector.index_add_(0, torch.tensor(target, device=home), sums)
    return LocalEpoch(slots, vector, tuple(measured), seed_steps)


@dataclass(frozen=True)
class EpochSums:
    """The epoch as the summary needs it: per slot its squared sum and whether it was measured."""

    slots: tuple[Slot, ...]
    sums: Sequence[float]
    measured: Sequence[bool]
    seed_steps: Mapping[str, int]
    steps: int

    @classmethod
    def of(cls, local: LocalEpoch, steps: int) -> EpochSums:
        """A single process's epoch: the one host copy."""
        values = local.vector.tolist()
        n = len(local.slots)
        return cls(local.slots, [s + r for s, r in zip(values[:n], values[n:])], local.measured,
                   local.seed_steps, steps)
