"""The per-epoch summary handed to Tamiyo in process: plain, typed, printable."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SeedSummary:
    """One seed's epoch.

    Values are over the epoch's sampled optimizer steps at which the seed source listed the seed
    (``sampled_steps``): the RMS of the per-step gradient L2 norm (``total_norm``, ``top_layers``,
    ``layer_norms``) and its largest step (``max_norm``, ``layer_max``); NaN or Inf when a gradient
    was non-finite at any of them. ``max_step`` and ``layer_max_step`` are the optimizer steps at which
    those largest steps were (the first on ties; a non-finite step counts as the largest), numbered by
    the telemetry from 0 at the first optimizer step it observed, by ``observe_step(step=N)``, or by the
    framework's global step (docs/tamiyo.md); None when not measured. ``total_norm`` is None when no
    parameter of the seed had a gradient at any of them: *not measured*, which is not a zero gradient;
    ``top_layers`` is then empty, and a layer without a gradient is None in ``layer_norms`` and left out
    of the top-K.
    ``step_norm_counts`` counts the per-step seed norms per bucket of :data:`HISTOGRAM_BOUNDARIES`
    (the last bucket: above the last bound; non-finite steps are counted in ``nonfinite_steps``
    instead). ``host_ratio`` is Esper's gate, ``(seed / host) * sqrt(host params / seed params)``,
    when the host is measured (``TOLARIA_SEED_HOST_NORM``). ``health`` is one of
    ``health.HEALTH_STATES`` (docs/tamiyo.md). Esper's gradient health (docs/tamiyo.md) comes from the
    last three: the seed's gradient tensors that had a gradient (``gradient_tensors``) and, summed over
    its sampled steps, how many tensor-steps had a norm below ``TOLARIA_SEED_TENSOR_VANISHING_BELOW``
    (``vanishing_tensor_steps``) or above ``TOLARIA_SEED_TENSOR_EXPLODING_ABOVE`` or non-finite
    (``exploding_tensor_steps``); None where they were not counted (a seed with a
    sharded gradient under torch.distributed: a shard's norm is not its tensor's).
    """

    seed_id: str
    stage: str
    total_norm: float | None
    top_layers: tuple[tuple[str, float], ...]
    layer_count: int
    sampled_steps: int
    max_norm: float | None = None
    layer_norms: Mapping[str, float | None] = field(default_factory=dict)
    layer_max: Mapping[str, float | None] = field(default_factory=dict)
    max_step: int | None = None
    layer_max_step: Mapping[str, int | None] = field(default_factory=dict)
    nonfinite_steps: int = 0
    step_norm_counts: tuple[int, ...] = ()
    host_ratio: float | None = None
    health: str = ""
    #: Listed at some sampled step of the epoch but no longer at its end (culled, or gone from the source):
    #: this is its last summary; its values cover the steps it was listed at.
    left: bool = False
    #: A parameter was replaced or added inside the seed's module mid-epoch: measured on the new one from
    #: at most ``seed_tracker.PARAMETER_CHECK_EVERY`` sampled steps later, so the epoch's values are partial.
    partial: bool = False
    gradient_tensors: int | None = None
    vanishing_tensor_steps: int | None = None
    exploding_tensor_steps: int | None = None

    @property
    def measured(self) -> bool:
        return self.total_norm is not None

    @property
    def nonfinite_layers(self) -> tuple[str, ...]:
        return tuple(layer for layer, value in self.top_layers if not math.isfinite(value))


@dataclass(frozen=True)
class EpochSummary:
    """All active seeds at the end of one epoch, ordered by seed id; ``host_norm`` when measured.

    The values are the gradients before clipping; the clip is its own fact, over the sampled steps:
    ``clip_steps`` at which a clip was seen (``telemetry.clip_grad_norm_``, or torch's clip functions
    while attached), ``clipped_steps`` of them that it scaled down, and ``min_clip_factor``, its
    smallest factor ``min(max_norm / (total + 1e-6), 1)`` (None when no clip was seen; 1.0 when it
    never scaled).
    """

    epoch: int
    sampled_steps: int
    top_k: int
    seeds: Mapping[str, SeedSummary]
    host_norm: float | None = None
    clip_steps: int = 0
    clipped_steps: int = 0
    min_clip_factor: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; non-finite values become the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``,
        a value not measured is ``null``."""
        return {
            "epoch": self.epoch,
            "sampled_steps": self.sampled_steps,
            "top_k": self.top_k,
            "host_norm": json_number(self.host_norm),
            "seeds": [
                {
                    "seed_id": seed.seed_id,
                    "stage": seed.stage,
                    "sampled_steps": seed.sampled_steps,
                    "total_norm": json_number(seed.total_norm),
                    "max_norm": json_number(seed.max_norm),
                    "max_step": seed.max_step,
                    "layer_count": seed.layer_count,
                    "top_layers": [
                        {
                            "layer": layer,
                            "value": json_number(value),
                            "max": json_number(seed.layer_max.get(layer)),
                            "max_step": seed.layer_max_step.get(layer),
                        }
                        for layer, value in seed.top_layers
                    ],
                    "layers": {layer: json_number(value) for layer, value in seed.layer_norms.items()},
                    "layer_max_step": dict(seed.layer_max_step),
                    "nonfinite_steps": seed.nonfinite_steps,
                    "step_norm_counts": list(seed.step_norm_counts),
                    "host_ratio": json_number(seed.host_ratio),
                    "health": seed.health,
                    "left": seed.left,
                    "partial": seed.partial,
                    "gradient_tensors": seed.gradient_tensors,
                    "vanishing_tensor_steps": seed.vanishing_tensor_steps,
                    "exploding_tensor_steps": seed.exploding_tensor_steps,
                }
                for seed in self.seeds.values()
            ],
            "clip_steps": self.clip_steps,
            "clipped_steps": self.clipped_steps,
            "min_clip_factor": json_number(self.min_clip_factor),
        }

    def __str__(self) -> str:
        clip = (
            ""
            if self.min_clip_factor is None
            else f", clipped {self.clipped_steps}/{self.clip_steps}, smallest factor {self.min_clip_factor:.3g}"
        )
        lines = [f"epoch {self.epoch} ({self.sampled_steps} sampled steps, top {self.top_k}{clip})"]
        for seed in self.seeds.values():
            layers = ", ".join(f"{layer}={value:.4g}" for layer, value in seed.top_layers) or "no layers"
            total = "not measured" if seed.total_norm is None else f"{seed.total_norm:.4g}"
            lines.append(f"  {seed.seed_id} [{seed.stage}] {seed.health} total={total}: {layers}")
        return "\n".join(lines)


def json_number(value: float | None) -> float | str | None:
    """JSON has no NaN or Infinity; spell them as JavaScript's ``Number()`` reads them. None stays None."""
    if value is None or math.isfinite(value):
        return value
    if math.isnan(value):
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"
