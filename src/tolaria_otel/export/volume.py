"""What one trainer costs a metrics store: its series, per Prometheus name, for given settings.

A store (Prometheus, VictoriaMetrics, Mimir) bills by active series and by samples. Every
instrument here repeats each of its series at every export (gauges of the latest epoch, a
cumulative histogram), so samples per second are the series divided by the export interval.
Each bucket of a classic histogram is a series of its own (``_bucket{le=...}``, ``+Inf``
included), beside ``_sum`` and ``_count``: the step-norm histogram is most of the volume unless
its resolution is ``coarse`` or ``off`` (``TOLARIA_SEED_STEP_NORM_HISTOGRAM``).

``trainer_series`` counts a steady epoch: every exported seed measured, its values finite, one
stage. ``tests/test_volume.py`` checks it against the series a real trainer creates in a real
VictoriaMetrics and in Prometheus; ``tolaria-otel doctor`` prints it.
"""

from __future__ import annotations

from ..config.histogram import exported_buckets
from ..config.settings import SeedLayerSettings

PREFIX = "tolaria_grad_agg_"


def step_norm_buckets(settings: SeedLayerSettings) -> int:
    """Exported buckets of the per-step seed norm histogram (the one above the last bound included)."""
    return exported_buckets(settings.step_norm_histogram)


def trainer_series(
    settings: SeedLayerSettings, seeds: int, layers: int, *, clip: bool = False, seed_clips: int = 0
) -> dict[str, int]:
    """Series per Prometheus name that one trainer with ``seeds`` seeds of ``layers`` layers each
    exports at once under ``settings`` (names with no series left out).

    Seeds beyond ``settings.max_seeds`` are not exported; a seed exports ``min(top_k, layers)`` layers.
    The clip gauges exist only in epochs in which a clip was seen: ``clip``, a trainer-level clip (the
    host's, a global one: three series), and ``seed_clips`` of the exported seeds clipped on their own
    (Esper's per-seed clips: two series each, with ``seed_id`` and ``stage``).
    """
    if not settings.enabled:
        return {}
    exported = min(seeds, settings.max_seeds)
    layer_series = exported * min(settings.top_k, layers) if settings.emits_layers else 0
    buckets = step_norm_buckets(settings)
    series = {
        "seed_layer_info": 1,
        "seed_layer_series_budget": 1,
        "host_norm": int(settings.host_norm),
        "seed_norm": exported,
        "seed_norm_max": exported,
        "seed_host_ratio": exported if settings.host_norm else 0,
        "seed_layer_norm": layer_series,
        "seed_layer_norm_max": layer_series,
        "seed_step_norm_bucket": exported * buckets,
        "seed_step_norm_sum": exported if buckets else 0,
        "seed_step_norm_count": exported if buckets else 0,
        "clip_steps": int(clip),
        "clip_clipped_steps": int(clip),
        "clip_min_factor": int(clip),
        "seed_clip_clipped_steps": min(seed_clips, exported),
        "seed_clip_min_factor": min(seed_clips, exported),
    }
    return {PREFIX + name: count for name, count in series.items() if count}


def per_seed(settings: SeedLayerSettings, layers: int) -> int:
    """The series each exported seed adds (beside the trainer's own: info, budget and host_norm)."""
    layer_series = 2 * min(settings.top_k, layers) if settings.emits_layers else 0
    buckets = step_norm_buckets(settings)
    histogram = buckets + 2 if buckets else 0  # the buckets, _sum and _count
    return layer_series + 2 + int(settings.host_norm) + histogram  # norm, norm_max (and host_ratio)
