"""A small host network with seeds grafted in, and a scripted Kasmina-like seed source.

Used by the demo, the tests and the benchmarks, so all three train the same thing: the
work-package's 5-Linear host MLP, plus seeds of three Linear layers each whose output is blended
into the host's hidden state.
"""

from __future__ import annotations

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
