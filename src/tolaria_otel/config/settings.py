"""The ``TOLARIA_*`` configuration contract: names, defaults, parsing and validation.

Every variable is read once, when :meth:`SeedLayerSettings.from_env` is called. An empty or
all-blank value counts as unset, as the OpenTelemetry specification says for ``OTEL_*``
variables. A bad value fails fast with :class:`SettingsError`, naming the variable, the value
given and what is accepted, before any training work is done.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

from .environment import echoed, integer, positive_number
from .environment import value as env_value
from .histogram import STEP_NORM_HISTOGRAMS

#: Switches the feature on. Off (the default) means no hooks, buffers, instruments or points.
ENV_ENABLED = "TOLARIA_SEED_LAYER_SUMMARIES_ENABLED"
#: How many layers per seed are kept each epoch (largest gradient norm first).
ENV_TOP_K = "TOLARIA_SEED_LAYER_TOPK"
#: Compact seed health: per-seed totals only, no per-layer points.
ENV_COMPACT = "TOLARIA_SEED_HEALTH_COMPACT"
#: Measure every Nth optimizer step (1 measures every step).
ENV_SAMPLE_EVERY = "TOLARIA_SEED_LAYER_SAMPLE_EVERY"
#: Under torch.distributed, the one rank that exports (every rank computes and returns the summary).
ENV_EXPORT_RANK = "TOLARIA_SEED_LAYER_EXPORT_RANK"
#: Also measure the host (every trainable parameter outside the seeds): its norm and each seed's ratio to it.
ENV_HOST_NORM = "TOLARIA_SEED_HOST_NORM"
#: The most seeds a trainer exports per epoch (the first ones by seed id); the metric streams are sized for it.
ENV_MAX_SEEDS = "TOLARIA_SEED_LAYER_MAX_SEEDS"
#: Resolution of the exported per-step seed norm histogram: coarse, fine or off (the series it costs).
ENV_STEP_NORM_HISTOGRAM = "TOLARIA_SEED_STEP_NORM_HISTOGRAM"
#: Esper's gradient health: a gradient tensor whose norm at a step is below this counts as vanishing...
ENV_TENSOR_VANISHING_BELOW = "TOLARIA_SEED_TENSOR_VANISHING_BELOW"
#: ...and above this (or NaN or Inf) as exploding (Esper: 10 x its default clip norm of 1.0).
ENV_TENSOR_EXPLODING_ABOVE = "TOLARIA_SEED_TENSOR_EXPLODING_ABOVE"

#: The one table of the TOLARIA_* variables: the settings field each sets (``from_env`` reads each, ``doctor``
#: shows each with its default, ``.env.example`` and the README list each: tests/test_cli.py holds them equal).
VARIABLE_FIELDS = {
    ENV_ENABLED: "enabled",
    ENV_TOP_K: "top_k",
    ENV_COMPACT: "compact",
    ENV_SAMPLE_EVERY: "sample_every",
    ENV_EXPORT_RANK: "export_rank",
    ENV_HOST_NORM: "host_norm",
    ENV_MAX_SEEDS: "max_seeds",
    ENV_STEP_NORM_HISTOGRAM: "step_norm_histogram",
    ENV_TENSOR_VANISHING_BELOW: "tensor_vanishing_below",
    ENV_TENSOR_EXPLODING_ABOVE: "tensor_exploding_above",
}

# Esper's settings read the same two flags with pydantic's boolean grammar: the same words here, so a
# deployment Esper accepts starts the trainer too.
_TRUE = frozenset({"1", "true", "t", "yes", "y", "on"})
_FALSE = frozenset({"0", "false", "f", "no", "n", "off"})
_BOOL_ACCEPTED = "one of 1/true/t/yes/y/on or 0/false/f/no/n/off (any case)"

#: No ceiling of its own (Esper's settings take any positive integer): a seed exports at most the layers it
#: has, and the streams are sized from top_k and TOLARIA_SEED_LAYER_MAX_SEEDS, so nothing is cut for it.
TOP_K_MAX = 1_000_000
MAX_SEEDS_MAX = 1_000_000
SAMPLE_EVERY_MAX = 1_000_000
#: Checked against the real world size when the telemetry starts under torch.distributed.
EXPORT_RANK_MAX = 1_000_000
#: Esper's thresholds (simic/telemetry/gradient_collector.py).
TENSOR_VANISHING_BELOW = 1e-7
TENSOR_EXPLODING_ABOVE = 10.0


class SettingsError(ValueError):
    """A ``TOLARIA_*`` value (or a settings field) is not one the contract accepts."""


@dataclass(frozen=True)
class SeedLayerSettings:
    """Effective configuration of the per-layer seed summaries. Immutable."""

    enabled: bool = False
    top_k: int = 3
    compact: bool = False
    sample_every: int = 1
    export_rank: int = 0
    host_norm: bool = False
    max_seeds: int = 1000
    step_norm_histogram: str = "coarse"
    tensor_vanishing_below: float = TENSOR_VANISHING_BELOW
    tensor_exploding_above: float = TENSOR_EXPLODING_ABOVE

    def __post_init__(self) -> None:
        for name in ("enabled", "compact", "host_norm"):
            if not isinstance(getattr(self, name), bool):
                raise SettingsError(f"{name}={echoed(getattr(self, name))} is not valid: expected a bool")
        _check_int("top_k", self.top_k, TOP_K_MAX)
        _check_int("sample_every", self.sample_every, SAMPLE_EVERY_MAX)
        _check_int("export_rank", self.export_rank, EXPORT_RANK_MAX, minimum=0)
        _check_int("max_seeds", self.max_seeds, MAX_SEEDS_MAX)
        if self.step_norm_histogram not in STEP_NORM_HISTOGRAMS:
            raise SettingsError(
                f"step_norm_histogram={echoed(self.step_norm_histogram)} is not valid: expected "
                f"one of {', '.join(STEP_NORM_HISTOGRAMS)}"
            )
        _check_bounds(self.tensor_vanishing_below, self.tensor_exploding_above)

    @property
    def emits_layers(self) -> bool:
        """True when per-layer points go out: the feature is on and compact mode is off."""
        return self.enabled and not self.compact

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> SeedLayerSettings:
        """Read the ``TOLARIA_*`` variables from ``environ`` (default: ``os.environ``)."""
        env = os.environ if environ is None else environ
        defaults = cls()
        return cls(
            enabled=_parse_bool(env, ENV_ENABLED, defaults.enabled),
            top_k=_parse_int(env, ENV_TOP_K, defaults.top_k, TOP_K_MAX),
            compact=_parse_bool(env, ENV_COMPACT, defaults.compact),
            sample_every=_parse_int(env, ENV_SAMPLE_EVERY, defaults.sample_every, SAMPLE_EVERY_MAX),
            export_rank=_parse_int(env, ENV_EXPORT_RANK, defaults.export_rank, EXPORT_RANK_MAX, minimum=0),
            host_norm=_parse_bool(env, ENV_HOST_NORM, defaults.host_norm),
            max_seeds=_parse_int(env, ENV_MAX_SEEDS, defaults.max_seeds, MAX_SEEDS_MAX),
            step_norm_histogram=_parse_choice(
                env, ENV_STEP_NORM_HISTOGRAM, defaults.step_norm_histogram, STEP_NORM_HISTOGRAMS
            ),
            **_parse_bounds(env),
        )

    def replace(self, **changes: object) -> SeedLayerSettings:
        """A copy with some fields changed (validated like the original)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def _parse_bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env_value(env, name)
    if raw is None:
        return default
    word = raw.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise SettingsError(f"{name}={echoed(raw)} is not valid: expected {_BOOL_ACCEPTED}")


def _parse_choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    raw = env_value(env, name)
    if raw is None:
        return default
    word = raw.strip().lower()
    if word not in choices:
        raise SettingsError(f"{name}={echoed(raw)} is not valid: expected one of {', '.join(choices)} (any case)")
    return word


def _parse_int(env: Mapping[str, str], name: str, default: int, maximum: int, minimum: int = 1) -> int:
    raw = env_value(env, name)
    if raw is None:
        return default
    parsed = integer(raw, minimum, maximum)
    if parsed is None:
        raise SettingsError(f"{name}={echoed(raw)} is not valid: expected an integer from {minimum} to {maximum}")
    return parsed


def _check_int(name: str, value: object, maximum: int, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise SettingsError(f"{name}={echoed(value)} is not valid: expected an integer from {minimum} to {maximum}")


_POSITIVE = "a finite number above 0, such as 1e-7"


def _parse_positive(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env_value(env, name)
    if raw is None:
        return default
    value = positive_number(raw)
    if value is None:
        raise SettingsError(f"{name}={echoed(raw)} is not valid: expected {_POSITIVE}")
    return value


def _parse_bounds(env: Mapping[str, str]) -> dict[str, float]:
    lower = _parse_positive(env, ENV_TENSOR_VANISHING_BELOW, TENSOR_VANISHING_BELOW)
    upper = _parse_positive(env, ENV_TENSOR_EXPLODING_ABOVE, TENSOR_EXPLODING_ABOVE)
    if lower >= upper:
        raise SettingsError(
            f"{ENV_TENSOR_VANISHING_BELOW}={lower!r} is not below {ENV_TENSOR_EXPLODING_ABOVE}="
            f"{upper!r}: expected the vanishing threshold below the exploding one"
        )
    return {"tensor_vanishing_below": lower, "tensor_exploding_above": upper}


def _check_bounds(lower: object, upper: object) -> None:
    for name, value in (("tensor_vanishing_below", lower), ("tensor_exploding_above", upper)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
            raise SettingsError(f"{name}={echoed(value)} is not valid: expected {_POSITIVE}")
    if lower >= upper:  # type: ignore[operator]
        raise SettingsError(
            f"tensor_vanishing_below={lower!r} is not below tensor_exploding_above={upper!r}: "
            "expected the vanishing threshold below the exploding one"
        )
