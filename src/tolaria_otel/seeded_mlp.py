"""A small host network with seeds grafted in, and a scripted Kasmina-like seed source.

Used by the demo, the tests and the benchmarks, so all three train the same thing: the
work-package's 5-Linear host MLP, plus seeds of three Linear layers each whose output is blended
into the host's hidden state.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .seeds import SeedMapping


class Seed(nn.Module):
    """A seed: a 3-Linear residual branch on the host's hidden state."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, width))
        self.alpha = 1.0  # blending weight; the lifecycle moves it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.alpha * self.net(x)


class SeededMLP(nn.Module):
    """A 5-Linear MLP whose middle hidden state receives the output of every grafted seed."""

    def __init__(self, in_features: int = 32, width: int = 64, out_features: int = 10) -> None:
        super().__init__()
        self.width = width
        self.stem = nn.Sequential(nn.Linear(in_features, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                                  nn.Linear(width, out_features))
        self.seeds = nn.ModuleDict()

    def graft(self, seed_id: str, hidden: int = 32) -> Seed:
        seed = Seed(self.width, hidden)
        self.seeds[seed_id] = seed
        return seed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for seed in self.seeds.values():
            h = h + seed(h)
        return self.head(h)


class SeedRegistry:
    """The minimum Kasmina offers this package: the active seeds, their modules and stages."""

    def __init__(self) -> None:
        self.stages: dict[str, str] = {}
        self.modules: dict[str, nn.Module] = {}

    def add(self, seed_id: str, module: nn.Module, stage: str = "GERMINATED") -> None:
        self.modules[seed_id] = module
        self.stages[seed_id] = stage

    def remove(self, seed_id: str) -> None:
        self.modules.pop(seed_id)
        self.stages.pop(seed_id)

    def __call__(self) -> SeedMapping:
        return {seed_id: (self.modules[seed_id], stage) for seed_id, stage in self.stages.items()}


#: The stages of a young seed, one epoch each, in order.
YOUNG_STAGES = ("GERMINATED", "TRAINING", "BLENDING")
#: A seed's blending weight in each stage but BLENDING, where it rises across the epoch.
STAGE_ALPHA = {"GERMINATED": 0.1, "TRAINING": 0.1, "FOSSILIZED": 1.0, "CULLED": 0.0}


class ScriptedLifecycle:
    """Kasmina, scripted: seeds germinate, train, blend and fossilize on a fixed plan; one is culled.

    Seed ``i`` (id ``seed-i``) germinates at epoch ``i // 2``, two at a time, then spends one epoch
    each GERMINATED, TRAINING and BLENDING and is FOSSILIZED from then on. Seed 1 is CULLED instead
    of fossilizing, and removed from the registry and the model an epoch later. The blending weight
    ``alpha`` follows the stage: 0.1 while germinated or training (the seed learns but barely moves
    the host's output), raised from 0.1 to 1 across the BLENDING epoch, 1 once fossilized (it trains
    on as part of the host) and 0 once culled (its gradients are exactly zero).

    ``on_graft`` receives every new seed module, to move it to the device and hand its parameters
    to the optimizer.
    """

    CULLED_INDEX = 1

    def __init__(self, model: SeededMLP, registry: SeedRegistry, seed_count: int,
                 on_graft: Callable[[Seed], None] = lambda seed: None) -> None:
        self.model = model
        self.registry = registry
        self.seed_count = seed_count
        self._on_graft = on_graft
        self._seeds: dict[str, Seed] = {}

    def stage_at(self, index: int, epoch: int) -> str | None:
        """Seed ``index``'s stage during ``epoch``; None before it germinates and after its removal."""
        age = epoch - index // 2
        if age < 0:
            return None
        if age < len(YOUNG_STAGES):
            return YOUNG_STAGES[age]
        if index != self.CULLED_INDEX:
            return "FOSSILIZED"
        return "CULLED" if age == len(YOUNG_STAGES) else None

    def germinate(self, epoch: int) -> None:
        """Graft the seeds whose first epoch is ``epoch``.

        Call it before the telemetry's ``end_epoch()`` of the epoch before: the telemetry takes the
        next epoch's layout from the seeds it reads there, so the new seeds are measured from their
        first epoch on (and are not reported for the epoch that is ending, which they missed).
        """
        for index in range(self.seed_count):
            if self.stage_at(index, epoch) == "GERMINATED":
                seed = self.model.graft(f"seed_{index}")
                seed.alpha = STAGE_ALPHA["GERMINATED"]
                self._on_graft(seed)
                self._seeds[f"seed-{index}"] = seed
                self.registry.add(f"seed-{index}", seed, "GERMINATED")

    def start_epoch(self, epoch: int) -> None:
        """Move every grafted seed to its stage for ``epoch``, removing the one culled an epoch ago."""
        for index in range(self.seed_count):
            seed_id = f"seed-{index}"
            if seed_id not in self._seeds:
                continue
            stage = self.stage_at(index, epoch)
            if stage is None:
                self.registry.remove(seed_id)
                del self.model.seeds[f"seed_{index}"]
                del self._seeds[seed_id]
                continue
            self.registry.stages[seed_id] = stage
            if stage != "BLENDING":
                self._seeds[seed_id].alpha = STAGE_ALPHA[stage]

    def blend(self, progress: float) -> None:
        """Set the blending seeds' alpha for ``progress`` (0 to 1) through the current epoch."""
        low = STAGE_ALPHA["TRAINING"]
        for seed_id, seed in self._seeds.items():
            if self.registry.stages[seed_id] == "BLENDING":
                seed.alpha = low + (1.0 - low) * progress
