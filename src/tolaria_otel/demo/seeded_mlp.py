"""A small host network with seeds grafted in, and a scripted Kasmina-like seed source.

Used by the demo, the tests and the benchmarks, so all three train the same thing: the
work-package's 5-Linear host MLP, plus seeds of three Linear layers each whose output is blended
into the host's hidden state.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..measure.seeds import SeedMapping


class Seed(nn.Module):
    """A seed: a residual branch of ``depth`` Linear layers on the host's hidden state."""

    def __init__(self, width: int, hidden: int, depth: int = 3) -> None:
        super().__init__()
        sizes = [width] + [hidden] * (depth - 1) + [width]
        layers: list[nn.Module] = []
        for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
            layers += [nn.Linear(fan_in, fan_out)] + ([nn.ReLU()] if i < depth - 1 else [])
        self.net = nn.Sequential(*layers)
        self.alpha = 1.0  # blending weight; the lifecycle moves it
        self.in_graph = True  # False once culled: the host skips it, so it gets no gradient at all

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.alpha * self.net(x)
        return out


class SeededMLP(nn.Module):
    """A 5-Linear MLP whose middle hidden state receives the output of every grafted seed."""

    def __init__(self, in_features: int = 32, width: int = 64, out_features: int = 10) -> None:
        super().__init__()
        self.width = width
        self.stem = nn.Sequential(nn.Linear(in_features, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.head = nn.Sequential(
            nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, out_features)
        )
        self.seeds = nn.ModuleDict()

    def graft(self, seed_id: str, hidden: int = 32, depth: int = 3) -> Seed:
        seed = Seed(self.width, hidden, depth)
        self.seeds[seed_id] = seed
        return seed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for seed in self.seeds.values():
            if seed.in_graph:
                h = h + seed(h)
        out: torch.Tensor = self.head(h)
        return out


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


#: Kasmina's stage names, as its protobuf enum ``SeedStage`` spells them (``SeedStage.Name``).
GERMINATED, TRAINING, BLENDING, FOSSILIZED, CULLED = (
    f"SEED_STAGE_{name}" for name in ("GERMINATED", "TRAINING", "BLENDING", "FOSSILIZED", "CULLED")
)
#: The stages of a young seed, one epoch each, in order.
YOUNG_STAGES = (GERMINATED, TRAINING, BLENDING)
#: A seed's blending weight in each stage but BLENDING, where it rises across the epoch.
STAGE_ALPHA = {GERMINATED: 0.1, TRAINING: 0.1, FOSSILIZED: 1.0, CULLED: 0.0}


@dataclass(frozen=True)
class Germination:
    """When seed ``index`` is grafted: at ``step`` of ``epoch`` (0: before the epoch's first step)."""

    epoch: int
    step: int


class ScriptedLifecycle:
    """Kasmina and Tamiyo, scripted: seeds germinate at any step, train, blend and fossilize; one is culled.

    The plan (seed ids ``seed-0`` to ``seed-3``; ``--seeds N`` takes the first N):

    * ``seed-0`` germinates before the first step;
    * ``seed-1`` right after the first epoch ends (Tamiyo read the summary and germinated), and is
      culled three epochs later: CULLED for an epoch, out of the graph (no gradient at all, so *not
      measured*, never a zero), then removed from Kasmina and the model (gone);
    * ``seed-2`` in the middle of the second epoch, ``seed-3`` in the middle of the third.

    Counting its germination epoch as the first, a seed is GERMINATED, TRAINING and BLENDING for
    one epoch each, then FOSSILIZED. The blending weight ``alpha`` follows the stage: 0.1 while
    germinated or training, raised from 0.1 to 1 across the BLENDING epoch, 1 once fossilized.

    ``on_graft`` receives every new seed module, to move it to the device and hand its parameters
    to the optimizer.
    """

    CULLED_INDEX = 1
    DEPTH = 5  # Linear layers per seed: more than the default top-K, so the top-K selects

    def __init__(
        self,
        model: SeededMLP,
        registry: SeedRegistry,
        seed_count: int,
        steps_per_epoch: int,
        on_graft: Callable[[Seed], None] = lambda seed: None,
    ) -> None:
        self.model = model
        self.registry = registry
        middle = steps_per_epoch // 2
        self.plan = ((0, 0), (1, 0), (1, middle), (2, middle))[:seed_count]  # (epoch, step) of each germination
        self._on_graft = on_graft
        self._seeds: dict[str, Seed] = {}
        if self.plan[0] == (0, 0):
            self._germinate(0)

    def stage_at(self, index: int, epoch: int) -> str | None:
        """Seed ``index``'s stage during ``epoch``; None before it germinates and after its removal."""
        age = epoch - self.plan[index][0]
        if age < 0:
            return None
        if age < len(YOUNG_STAGES):
            return YOUNG_STAGES[age]
        if index != self.CULLED_INDEX:
            return FOSSILIZED
        return CULLED if age == len(YOUNG_STAGES) else None

    def before_step(self, epoch: int, step: int, steps: int) -> None:
        """Germinate what the plan says for this step (mid-epoch), and move the blending seeds' alpha."""
        for index, when in enumerate(self.plan):
            if when == (epoch, step) and step > 0:
                self._germinate(index)
        low = STAGE_ALPHA[TRAINING]
        for seed_id, seed in self._seeds.items():
            if self.registry.stages[seed_id] == BLENDING:
                seed.alpha = low + (1.0 - low) * step / max(steps - 1, 1)

    def after_epoch(self, epoch: int) -> None:
        """Right after ``end_epoch()``: Tamiyo germinates the seeds planned for the next epoch's start."""
        for index, when in enumerate(self.plan):
            if when == (epoch + 1, 0):
                self._germinate(index)

    def start_epoch(self, epoch: int) -> None:
        """Move every grafted seed on to its stage for ``epoch``; remove the one culled an epoch ago."""
        for index in range(len(self.plan)):
            seed_id = f"seed-{index}"
            seed = self._seeds.get(seed_id)
            if seed is None:
                continue
            stage = self.stage_at(index, epoch)
            if stage is None:
                self.registry.remove(seed_id)
                del self.model.seeds[f"seed_{index}"]
                del self._seeds[seed_id]
                continue
            self.registry.stages[seed_id] = stage
            seed.in_graph = stage != CULLED
            if stage != BLENDING:
                seed.alpha = STAGE_ALPHA[stage]

    def _germinate(self, index: int) -> None:
        seed = self.model.graft(f"seed_{index}", depth=self.DEPTH)
        seed.alpha = STAGE_ALPHA[GERMINATED]
        self._on_graft(seed)
        self._seeds[f"seed-{index}"] = seed
        self.registry.add(f"seed-{index}", seed, GERMINATED)
