"""The per-epoch summary handed to Tamiyo in process: plain, typed, printable."""

from __future__ import annotations

import collections.abc
import dataclasses
import math
import types
import typing
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
    #: Elements of the seed's parameters that had a gradient (Esper's ``seed_param_count``); None: not measured.
    gradient_numel: int | None = None
    #: The last sampled step at which the seed was listed, as Esper keeps it: the seed's gradient norm there,
    #: its gradient tensors that had a gradient, and how many of them were below or above the health bounds
    #: (``integrations.esper.gradient_fields``); None: not measured, or not known (under torch.distributed).
    last_step_norm: float | None = None
    last_step_tensors: int | None = None
    last_step_vanishing_tensors: int | None = None
    last_step_exploding_tensors: int | None = None
    #: The seed's own clip facts: over its sampled steps, those at which a clip of its own parameters only was
    #: seen (Esper clips each seed apart), those it scaled down, and its smallest factor (None: no clip of its
    #: own; a clip spanning the host or several seeds, a global one included, is the EpochSummary's instead).
    clip_steps: int = 0
    clipped_steps: int = 0
    min_clip_factor: float | None = None

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
    ``clip_steps`` at which a trainer-level clip was seen (``telemetry.clip_grad_norm_``, or torch's clip
    functions while attached), ``clipped_steps`` of them that it scaled down, and ``min_clip_factor``, its
    smallest factor ``min(max_norm / (total + 1e-6), 1)`` (None when no such clip was seen; 1.0 when it
    never scaled). A trainer-level clip is any clip whose parameters are not all one seed's: the host's
    own, one over several seeds, a global clip over the whole model (which scales every seed too). A clip
    of one seed's parameters only is that seed's fact (``SeedSummary.clip_steps`` ...), not the trainer's.
    """

    epoch: int
    sampled_steps: int
    top_k: int
    seeds: Mapping[str, SeedSummary]
    host_norm: float | None = None
    clip_steps: int = 0
    clipped_steps: int = 0
    min_clip_factor: float | None = None
    #: With ``TOLARIA_SEED_HOST_NORM``: the host's norm at the epoch's last sampled step and its elements
    #: that had a gradient (Esper's ratio, ``integrations.esper.gradient_fields``); else None.
    host_last_step_norm: float | None = None
    host_numel: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, every field under its name (``layer_norms`` as ``layers``, ``top_layers`` as
        ``{"layer", "value", "max", "max_step"}`` entries); non-finite values become the strings ``"NaN"``,
        ``"Infinity"``, ``"-Infinity"``, a value not measured is ``null``. :meth:`from_dict` reads it back."""
        out = {name: _encoded(getattr(self, name)) for name in _field_names(EpochSummary) if name != "seeds"}
        out["seeds"] = [_seed_dict(seed) for seed in self.seeds.values()]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EpochSummary:
        """The inverse of :meth:`to_dict` (of this version or an earlier one: a missing key is the default)."""
        seeds = [_decoded_fields(SeedSummary, _seed_fields(seed, data)) for seed in data["seeds"]]
        fields = {name: value for name, value in data.items() if name != "seeds"}
        return cls(
            **_decoded_fields(EpochSummary, fields), seeds={seed["seed_id"]: SeedSummary(**seed) for seed in seeds}
        )

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
            own = (
                ""
                if seed.min_clip_factor is None
                else f" (clipped {seed.clipped_steps}/{seed.clip_steps}, smallest factor {seed.min_clip_factor:.3g})"
            )
            lines.append(f"  {seed.seed_id} [{seed.stage}] {seed.health} total={total}{own}: {layers}")
        return "\n".join(lines)


#: JSON names that are not the field's own (kept from the first version of the format).
_SEED_KEYS = {"layer_norms": "layers"}


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _encoded(value: object) -> object:
    if isinstance(value, float):
        return json_number(value)
    if isinstance(value, Mapping):
        return {key: _encoded(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return [_encoded(item) for item in value]
    return value


def _seed_dict(seed: SeedSummary) -> dict[str, Any]:
    out = {_SEED_KEYS.get(name, name): _encoded(getattr(seed, name)) for name in _field_names(SeedSummary)}
    out["top_layers"] = [
        {
            "layer": layer,
            "value": json_number(value),
            "max": json_number(seed.layer_max.get(layer)),
            "max_step": seed.layer_max_step.get(layer),
        }
        for layer, value in seed.top_layers
    ]
    return out


def _seed_fields(seed: Mapping[str, Any], epoch: Mapping[str, Any]) -> dict[str, Any]:
    """A seed's JSON entry by field name; an entry of an earlier version lacks some (their defaults apply)."""
    fields = {name: seed[key] for name in _field_names(SeedSummary) if (key := _SEED_KEYS.get(name, name)) in seed}
    fields["top_layers"] = [(entry["layer"], entry["value"]) for entry in seed["top_layers"]]
    fields.setdefault("sampled_steps", epoch["sampled_steps"])  # version 0.1 had it per epoch only
    if "layer_max" not in seed:  # before 0.3: the maxima of the top-K layers only
        fields["layer_max"] = {entry["layer"]: entry["max"] for entry in seed["top_layers"] if "max" in entry}
    return fields


def _decoded_fields(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    """JSON values as the fields' types: the type hints say how (so a new field needs no code here)."""
    hints = typing.get_type_hints(cls)
    return {name: _decoded(hints[name], data[name]) for name in _field_names(cls) if name in data}


def _decoded(hint: Any, value: Any) -> Any:
    if value is None:
        return None
    origin = typing.get_origin(hint)
    arguments = [a for a in typing.get_args(hint) if a is not type(None)]
    if origin in (typing.Union, types.UnionType):
        return _decoded(arguments[0], value)
    if origin is tuple:
        item = arguments[0] if arguments[-1] is Ellipsis else None
        return tuple(_decoded(item or arguments[i], v) for i, v in enumerate(value))
    if origin in (Mapping, dict, collections.abc.Mapping):
        return {key: _decoded(arguments[1], item) for key, item in value.items()}
    if hint is float:
        return float(value)  # "NaN" and "Infinity" too
    if hint in (int, bool, str):
        return hint(value)
    return value


def json_number(value: float | None) -> float | str | None:
    """JSON has no NaN or Infinity; spell them as JavaScript's ``Number()`` reads them. None stays None."""
    if value is None or math.isfinite(value):
        return value
    if math.isnan(value):
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"
