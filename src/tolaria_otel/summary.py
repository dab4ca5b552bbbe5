"""The per-epoch summary handed to Tamiyo in process: plain, typed, printable."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SeedSummary:
    """One seed's epoch: its stage, total gradient norm and top-K layers in rank order.

    Values are the RMS, over the epoch's sampled optimizer steps at which the seed source listed
    the seed (``sampled_steps``), of the gradient L2 norm; NaN or Inf when a gradient was non-finite
    at any of them. ``total_norm`` is None when no parameter of the seed had a gradient at any of
    them: *not measured*, which is not a zero gradient; ``top_layers`` is then empty. A layer
    without a gradient at any of them is left out of the top-K for the same reason.
    """

    seed_id: str
    stage: str
    total_norm: float | None
    top_layers: tuple[tuple[str, float], ...]
    layer_count: int
    sampled_steps: int

    @property
    def measured(self) -> bool:
        return self.total_norm is not None

    @property
    def nonfinite_layers(self) -> tuple[str, ...]:
        return tuple(layer for layer, value in self.top_layers if not math.isfinite(value))


@dataclass(frozen=True)
class EpochSummary:
    """All active seeds at the end of one epoch, ordered by seed id."""

    epoch: int
    sampled_steps: int
    top_k: int
    seeds: Mapping[str, SeedSummary]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; non-finite values become the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``."""
        return {
            "epoch": self.epoch,
            "sampled_steps": self.sampled_steps,
            "top_k": self.top_k,
            "seeds": [
                {
                    "seed_id": seed.seed_id,
                    "stage": seed.stage,
                    "sampled_steps": seed.sampled_steps,
                    "total_norm": None if seed.total_norm is None else json_number(seed.total_norm),
                    "layer_count": seed.layer_count,
                    "top_layers": [{"layer": layer, "value": json_number(value)} for layer, value in seed.top_layers],
                }
                for seed in self.seeds.values()
            ],
        }

    def __str__(self) -> str:
        lines = [f"epoch {self.epoch} ({self.sampled_steps} sampled steps, top {self.top_k})"]
        for seed in self.seeds.values():
            layers = ", ".join(f"{layer}={value:.4g}" for layer, value in seed.top_layers) or "no layers"
            total = "not measured" if seed.total_norm is None else f"{seed.total_norm:.4g}"
            lines.append(f"  {seed.seed_id} [{seed.stage}] total={total}: {layers}")
        return "\n".join(lines)


def json_number(value: float) -> float | str:
    """JSON has no NaN or Infinity; spell them as JavaScript's ``Number()`` reads them."""
    if math.isfinite(value):
        return value
    if math.isnan(value):
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"
