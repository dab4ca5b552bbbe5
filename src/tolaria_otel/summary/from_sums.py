"""The epoch's sums turned into its summary: per seed, RMS and largest step per layer, top-K, health.

Pure host arithmetic on what the fold copied out (``epoch.EpochSums``): no tensor, no device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from ..measure.segment import HOST, LAST_STEP_ROWS, TOTAL
from ..reduce.fold import EpochSums
from .epoch_summary import EpochSummary, SeedSummary
from .health import classify
from .topk import top_k


def summarise(
    epoch: int,
    top: int,
    sums: EpochSums,
    stages: Mapping[str, str],
    left: Collection[str],
    step_of: Callable[[int], int | None],
    partial: Collection[str],
) -> EpochSummary:
    """The summary of an epoch with sampled steps: every seed of ``stages`` (listed at some sampled step,
    with its last stage), ``left`` the ones gone before its end, ``step_of`` the optimizer step number of a
    sampled step's index, ``partial`` those whose parameters were replaced in place; ``top`` layers per seed."""
    by_seed = _slot_values(sums, step_of)
    host = by_seed.get(HOST, {}).get(TOTAL)
    seeds = {}
    for seed_id, stage in stages.items():
        if not sums.seed_steps.get(seed_id):
            continue  # listed only after the last sampled step: measured from the next epoch on
        seeds[seed_id] = _seed_summary(
            seed_id, stage, by_seed.get(seed_id, {}), sums, host, top, seed_id in left, seed_id in partial
        )
    clips = sums.clips
    return EpochSummary(
        epoch,
        sums.steps,
        top,
        seeds,
        host.rms if host is not None else None,
        clip_steps=clips.steps,
        clipped_steps=clips.clipped,
        min_clip_factor=clips.smallest,
        host_last_step_norm=host.last_norm if host is not None else None,
        host_numel=host.numel if host is not None else None,
    )


@dataclass(frozen=True)
class _SlotValues:
    rms: float | None  # None: not measured
    max: float | None
    max_step: int | None  # the optimizer step of ``max``
    nonfinite: int
    numel: int
    tensors: int | None  # None: not known (the reduction did not carry it)
    vanishing: int | None  # None: not counted
    exploding: int | None
    #: At the last sampled step that measured the slot: its norm and tensor counts (None: not known).
    last_norm: float | None = None
    last_tensors: int | None = None
    last_vanishing: int | None = None
    last_exploding: int | None = None


def _slot_values(sums: EpochSums, step_of: Callable[[int], int | None]) -> dict[str, dict[str, _SlotValues]]:
    """Per seed, its slots by layer (``TOTAL`` for the seed's total): RMS and largest step over its steps."""
    out: dict[str, dict[str, _SlotValues]] = {}
    n = len(sums.slots)
    last = sums.last_step
    for i, (seed, layer) in enumerate(sums.slots):
        steps = sums.seed_steps.get(seed, 0)
        measured = sums.measured[i] and steps > 0
        known = measured and len(last) >= LAST_STEP_ROWS * n
        out.setdefault(seed, {})[layer] = _SlotValues(
            math.sqrt(sums.sums[i] / steps) if measured else None,
            math.sqrt(sums.maxima[i]) if measured else None,
            _step(sums, i, step_of) if measured else None,
            sums.nonfinite[i],
            sums.numel[i],
            sums.tensors[i] if sums.tensors else None,
            sums.vanishing[i] if sums.vanishing is not None else None,
            sums.exploding[i] if sums.exploding is not None else None,
            math.sqrt(last[i]) if known else None,
            *((int(last[row * n + i]) for row in (1, 2, 3)) if known else (None, None, None)),
        )
    return out


def _step(sums: EpochSums, slot: int, step_of: Callable[[int], int | None]) -> int | None:
    """The optimizer step of a slot's largest square, from its sampled index (None when not carried)."""
    if slot >= len(sums.max_steps) or not math.isfinite(sums.max_steps[slot]):
        return None
    return step_of(round(sums.max_steps[slot]))


def _seed_summary(
    seed_id: str,
    stage: str,
    seed_slots: Mapping[str, _SlotValues],
    sums: EpochSums,
    host: _SlotValues | None,
    top: int,
    left: bool,
    partial: bool,
) -> SeedSummary:
    clips = sums.clips.seeds.get(seed_id)
    slots = dict(seed_slots)
    total = slots.pop(TOTAL, None)
    measured = total is not None and total.rms is not None
    layers = {layer: values.rms for layer, values in slots.items()}
    layer_max = {layer: values.max for layer, values in slots.items()}
    layer_max_step = {layer: values.max_step for layer, values in slots.items()}
    ratio = None
    if measured and host is not None and host.rms and total.numel:  # type: ignore[union-attr]
        # Esper's lifecycle gate: the seed's gradient against the host's, per parameter.
        ratio = (total.rms / host.rms) * math.sqrt(host.numel / total.numel)  # type: ignore[union-attr,operator]
    total_norm = total.rms if measured else None  # type: ignore[union-attr]
    max_norm = total.max if measured else None  # type: ignore[union-attr]
    nonfinite_steps = total.nonfinite if total is not None else 0
    return SeedSummary(
        seed_id=seed_id,
        stage=stage,
        total_norm=total_norm,
        top_layers=top_k({k: v for k, v in layers.items() if v is not None}, top) if measured else (),
        layer_count=len(slots),
        sampled_steps=sums.seed_steps[seed_id],
        max_norm=max_norm,
        max_step=total.max_step if measured else None,  # type: ignore[union-attr]
        layer_norms=layers,
        layer_max=layer_max,
        layer_max_step=layer_max_step,
        nonfinite_steps=nonfinite_steps,
        step_norm_counts=sums.counts.get(seed_id, ()) if measured else (),
        host_ratio=ratio,
        health=classify(total_norm, max_norm, layers.values(), nonfinite_steps),
        left=left,
        partial=partial,
        gradient_tensors=total.tensors if total is not None else 0,
        vanishing_tensor_steps=total.vanishing if total is not None else 0,
        exploding_tensor_steps=total.exploding if total is not None else 0,
        gradient_numel=total.numel if measured else None,  # type: ignore[union-attr]
        last_step_norm=total.last_norm if measured else None,  # type: ignore[union-attr]
        last_step_tensors=total.last_tensors if measured else None,  # type: ignore[union-attr]
        last_step_vanishing_tensors=total.last_vanishing if measured else None,  # type: ignore[union-attr]
        last_step_exploding_tensors=total.last_exploding if measured else None,  # type: ignore[union-attr]
        clip_steps=clips.steps if clips is not None else 0,
        clipped_steps=clips.clipped if clips is not None else 0,
        min_clip_factor=clips.smallest if clips is not None else None,
    )
