"""Esper (esper-lite) wired in: its seed slots as the seed source, and its gradient fields from a summary.

Duck-typed on Esper's model, documented against esper-lite commit 2016337e; nothing of Esper is imported
(docs/esper.md). The model has ``seed_slots`` (a mapping ``slot_id -> SeedSlot``); a ``SeedSlot`` has
``seed`` (the seed's module, or None), ``alpha_schedule`` (the gate, a module created inside the slot when a
gated seed starts blending, or None) and ``state`` (None while the slot is empty; else ``state.stage``, an
``IntEnum`` ``SeedStage``, and ``state.seed_id``, stamped with the episode: ``ep15_env1_seed_0``).

The exported series are keyed by the slot id (``r0c0``: a handful per run), never by the seed id, which
is new at every episode; the seed id stays in process: :meth:`EsperSeeds.seed_id_of`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from ..summary.epoch_summary import EpochSummary, SeedSummary

#: Esper's gradient health (``simic/telemetry/gradient_collector.py``): the penalties per vanishing and
#: exploding tensor, and the floor below which a norm counts as none in its seed/host ratio.
VANISHING_PENALTY = 0.5
EXPLODING_PENALTY = 0.8
RATIO_EPSILON = 1e-8


class SlotParameters(nn.Module):
    """What Esper measures of a slot (``SeedSlot.get_parameters()``): its seed and its gate, as children
    named as in the slot (``seed``, ``alpha_schedule``), so the layers are named as the slot names them.

    A fresh one stands for a slot whenever its seed or gate is another object: the telemetry's segments are
    keyed by module identity, so a gate created at blending (a parameter new inside the same slot) is
    measured from the step it appears, not found later by the periodic walk (no partial epoch)."""

    def __init__(self, seed: nn.Module | None, gate: object) -> None:
        super().__init__()
        if seed is not None:
            self.seed = seed
        if isinstance(gate, nn.Module):
            self.alpha_schedule = gate


class EsperSeeds:
    """The seed source of an Esper model: ``{slot_id: (slot's seed and gate, stage name)}`` for every slot
    that has a state (a germinated seed, whatever its stage), read at each sampled step.

    Per call: a few attribute reads per slot and an identity check of its seed and gate (the
    :class:`SlotParameters` of a slot is cached while both stay the same objects). The episode-stamped seed
    id of each slot is kept here: :meth:`seed_id_of`, :attr:`seed_ids`.
    """

    def __init__(self, model: nn.Module) -> None:
        slots = getattr(model, "seed_slots", None)
        if not isinstance(slots, Mapping) and not isinstance(slots, nn.ModuleDict):
            raise TypeError(
                f"EsperSeeds(model): {type(model).__name__} has no seed_slots mapping slot ids to SeedSlots "
                "(Esper's MorphogeneticModel has one)"
            )
        self._slots: Any = slots
        self._views: dict[str, tuple[object, object, SlotParameters]] = {}
        self._seed_ids: dict[str, str] = {}

    def __call__(self) -> dict[str, tuple[nn.Module, str]]:
        out: dict[str, tuple[nn.Module, str]] = {}
        views = self._views
        for slot_id, slot in self._slots.items():
            state = slot.state
            if state is None:
                continue
            seed, gate = slot.seed, slot.alpha_schedule
            view = views.get(slot_id)
            if view is None or view[0] is not seed or view[1] is not gate:
                view = views[slot_id] = (seed, gate, SlotParameters(seed, gate))
            stage = state.stage
            out[slot_id] = (view[2], getattr(stage, "name", stage))
            self._seed_ids[slot_id] = state.seed_id
        return out

    def seed_id_of(self, slot_id: str) -> str | None:
        """The seed id (``ep15_env1_seed_0``) the slot held when last read (at the last sampled step, or at
        the epoch end, which reads the source too): the episode's seed behind a summary keyed by slot."""
        return self._seed_ids.get(slot_id)

    @property
    def seed_ids(self) -> dict[str, str]:
        """``{slot_id: seed_id}`` as last read (a slot emptied since keeps its last seed id)."""
        return dict(self._seed_ids)


@dataclass(frozen=True)
class GradientFields:
    """Esper's per-slot gradient fields (``SeedState.sync_telemetry``), and its seed/host ratio.

    ``measured`` is False when no gradient of the seed was there (Esper's collector then gives a norm of
    0.0, health 1.0 and no flags, the values here; its trainer must not take them as healthy).
    ``gradient_ratio`` is None when the host is not measured (``TOLARIA_SEED_HOST_NORM``); Esper smooths it
    (an EMA, 0.9 old, 0.1 new) before its G2 gate reads it: that stays the caller's.
    """

    gradient_norm: float
    gradient_health: float
    has_vanishing: bool
    has_exploding: bool
    gradient_ratio: float | None
    measured: bool


def gradient_fields(
    seed: SeedSummary, summary: EpochSummary | None = None, *, over: Literal["last_step", "epoch"] = "last_step"
) -> GradientFields:
    """Esper's ``gradient_norm``, ``gradient_health``, ``has_vanishing``, ``has_exploding`` of a seed, and its
    seed/host ratio (with ``summary``, the seed's epoch, when the host is measured).

    ``over="last_step"`` (the default): of the epoch's last sampled step at which the seed was listed, as
    Esper keeps them (one batch per epoch); ``over="epoch"``: over all the epoch's sampled steps (the norm
    is the RMS, the health counts every tensor-step). The rules are Esper's: health
    ``clamp(1 - 0.5 v/n - 0.8 e/n, 0, 1)``, 0 when the norm is non-finite, with ``n`` tensors, ``v`` below
    ``TOLARIA_SEED_TENSOR_VANISHING_BELOW`` (1e-7), ``e`` above ``TOLARIA_SEED_TENSOR_EXPLODING_ABOVE`` (10)
    or non-finite; ratio ``(seed / sqrt(seed_numel)) / (host / sqrt(host_numel) + 1e-8)``, 0.0 when either
    norm is below 1e-8.
    """
    if over == "last_step":
        norm, tensors = seed.last_step_norm, seed.last_step_tensors
        vanishing, exploding = seed.last_step_vanishing_tensors, seed.last_step_exploding_tensors
        host = None if summary is None else summary.host_last_step_norm
    elif over == "epoch":
        norm, vanishing, exploding = seed.total_norm, seed.vanishing_tensor_steps, seed.exploding_tensor_steps
        tensors = None if seed.gradient_tensors is None else seed.gradient_tensors * seed.sampled_steps
        host = None if summary is None else summary.host_norm
    else:
        raise ValueError(f"gradient_fields(over={over!r}): expected 'last_step' or 'epoch'")
    host_numel = None if summary is None else summary.host_numel
    ratio = None if host is None or host_numel is None else seed_host_ratio(norm, seed.gradient_numel, host, host_numel)
    if norm is None or not tensors or vanishing is None or exploding is None:
        return GradientFields(0.0, 1.0, False, False, ratio, measured=False)  # Esper's collector, no gradient
    health = 0.0
    if math.isfinite(norm):
        health = min(
            max(1.0 - VANISHING_PENALTY * vanishing / tensors - EXPLODING_PENALTY * exploding / tensors, 0.0), 1.0
        )
    return GradientFields(norm, health, vanishing > 0, exploding > 0, ratio, measured=True)


def seed_host_ratio(seed: float | None, seed_numel: int | None, host: float, host_numel: int) -> float:
    """Esper's ``DualGradientStats.normalized_ratio``: the seed's gradient per parameter against the host's."""
    if seed is None or not seed_numel or not host_numel or host < RATIO_EPSILON or seed < RATIO_EPSILON:
        return 0.0
    return (seed / math.sqrt(seed_numel)) / (host / math.sqrt(host_numel) + RATIO_EPSILON)
