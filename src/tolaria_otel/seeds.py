"""What a seed source looks like (Kasmina's view of the active seeds) and layer discovery.

A seed source is a mapping ``seed_id -> (module, stage)`` or a zero-argument callable that returns
one. A *layer* is a submodule of the seed module, named as ``seed_module.named_modules()`` names it,
that holds trainable parameters of its own; the seed module's own direct parameters form the layer
``(root)``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import nn

ROOT_LAYER = "(root)"

SeedStage = str | enum.Enum
SeedMapping = Mapping[str, tuple[nn.Module, SeedStage]]
SeedSource = SeedMapping | Callable[[], SeedMapping]


@dataclass(frozen=True)
class SeedView:
    """One active seed as the source reports it at one moment."""

    seed_id: str
    module: nn.Module
    stage: str


@dataclass(frozen=True)
class SeedLayout:
    """A seed's layers and the trainable parameters directly owned by each, in discovery order."""

    seed_id: str
    layers: tuple[tuple[str, tuple[nn.Parameter, ...]], ...]


def read_seeds(source: SeedSource) -> dict[str, SeedView]:
    """Call (if needed) and validate a seed source; the result is ordered by seed id."""
    mapping = source() if callable(source) else source
    if not isinstance(mapping, Mapping):
        raise TypeError(
            f"seed source returned {type(mapping).__name__}: expected a mapping seed_id -> (module, stage)"
        )
    views: dict[str, SeedView] = {}
    for seed_id, entry in mapping.items():
        if not isinstance(seed_id, str) or not seed_id:
            raise TypeError(f"seed id {seed_id!r} is not valid: expected a non-empty str")
        if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], nn.Module)):
            raise TypeError(f"seed {seed_id!r}: expected a (torch.nn.Module, stage) pair, got {entry!r}")
        module, stage = entry
        views[seed_id] = SeedView(seed_id, module, stage_name(seed_id, stage))
    return dict(sorted(views.items()))


def stage_name(seed_id: str, stage: SeedStage) -> str:
    """The stage as a plain string: passed through as given (an enum member gives its name)."""
    if isinstance(stage, enum.Enum):
        return stage.name
    if isinstance(stage, str) and stage:
        return stage
    raise TypeError(f"seed {seed_id!r}: stage {stage!r} is not valid: expected a non-empty str or an Enum member")


def discover_layers(seed: SeedView) -> SeedLayout:
    """The seed's layers: every submodule with trainable parameters of its own."""
    layers = []
    for name, module in seed.module.named_modules():
        params = tuple(p for p in module.parameters(recurse=False) if p.requires_grad)
        if params:
            layers.append((name or ROOT_LAYER, params))
    return SeedLayout(seed.seed_id, tuple(layers))
