"""What a seed source looks like (Kasmina's view of the active seeds) and layer discovery.

A seed source is a mapping ``seed_id -> (module, stage)`` or a zero-argument callable that returns
one. A stage is a ``str`` (passed through as given), an ``Enum`` member (its name) or an ``int`` (a
protobuf enum value, such as Kasmina's ``SeedStage``), named by the ``stage_names`` the user gives:
a mapping ``int -> str`` or a callable such as the protobuf enum's ``Name``. A *layer* is a submodule of
the seed module, named as ``seed_module.named_modules()`` names it, that holds trainable parameters of its
own; the seed module's own direct parameters form the layer ``(root)``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import nn

ROOT_LAYER = "(root)"

SeedStage = str | enum.Enum | int
SeedMapping = Mapping[str, tuple[nn.Module, SeedStage]]
SeedSource = SeedMapping | Callable[[], SeedMapping]
#: How ``int`` stages are named: ``{1: "SEED_STAGE_GERMINATED", ...}`` or ``SeedStage.Name``.
StageNames = Mapping[int, str] | Callable[[int], str]


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


def read_seeds(source: SeedSource, stage_names: StageNames | None = None) -> dict[str, SeedView]:
    """Call (if needed) and validate a seed source; the result is ordered by seed id."""
    return validate_seeds(source() if callable(source) else source, stage_names)


def validate_seeds(mapping: object, stage_names: StageNames | None = None) -> dict[str, SeedView]:
    """Validate what a seed source returned; the result is ordered by seed id."""
    if not isinstance(mapping, Mapping):
        raise TypeError(f"seed source returned {type(mapping).__name__}: expected a mapping seed_id -> (module, stage)")

    def named(value: object) -> str:
        """A plain value as its repr, anything else (a module's repr runs to pages) as its type's name."""
        plain = value is None or isinstance(value, str | int | float)
        return repr(value) if plain and len(repr(value)) <= 80 else type(value).__name__

    views: dict[str, SeedView] = {}
    for seed_id, entry in mapping.items():
        if not isinstance(seed_id, str) or not seed_id:
            raise TypeError(f"seed id {named(seed_id)} is not valid: expected a non-empty str")
        if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], nn.Module)):
            given = (
                f"a tuple of {len(entry)} ({', '.join(type(item).__name__ for item in entry[:4])}"
                f"{', ...' if len(entry) > 4 else ''})"
                if isinstance(entry, tuple)
                else type(entry).__name__
            )
            raise TypeError(f"seed {seed_id!r}: expected a (torch.nn.Module, stage) pair, got {given}")
        module, stage = entry
        views[seed_id] = SeedView(seed_id, module, stage_name(seed_id, stage, stage_names))
    return dict(sorted(views.items()))


def stage_name(seed_id: str, stage: SeedStage, stage_names: StageNames | None = None) -> str:
    """The stage as a plain string: passed through as given (an enum member gives its name, an int
    the name ``stage_names`` gives it)."""
    if isinstance(stage, enum.Enum):
        return stage.name
    if isinstance(stage, str) and stage:
        return stage
    if isinstance(stage, int) and not isinstance(stage, bool):
        if stage_names is None:
            raise TypeError(
                f"seed {seed_id!r}: stage {stage!r} is an int, but no stage_names were given: pass "
                "stage_names= (a mapping int -> str, or a protobuf enum's Name) to SeedLayerTelemetry"
            )
        name = stage_names(stage) if callable(stage_names) else stage_names.get(stage)
        if not isinstance(name, str) or not name:
            raise TypeError(f"seed {seed_id!r}: stage_names gave {name!r} for stage {stage}: expected a non-empty str")
        return name
    raise TypeError(
        f"seed {seed_id!r}: stage {stage!r} is not valid: expected a non-empty str, an Enum member, "
        "or an int named by stage_names"
    )


def discover_layers(seed: SeedView) -> SeedLayout:
    """The seed's layers: every submodule with trainable parameters of its own."""
    layers = []
    for name, module in seed.module.named_modules():
        params = tuple(p for p in module.parameters(recurse=False) if p.requires_grad)
        if params:
            layers.append((name or ROOT_LAYER, params))
    return SeedLayout(seed.seed_id, tuple(layers))
