"""The per-step seed norm histogram's one spec: the fine bounds the device counts in, and what is exported.

Read by the device statistics (``measure.segment``), the summary (``SeedSummary.step_norm_counts``), the
instruments and the volume; ``TOLARIA_SEED_STEP_NORM_HISTOGRAM`` picks a resolution (``config.settings``).
"""

from __future__ import annotations

#: Upper bounds of the per-step seed norm histogram's buckets: four per decade from 1e-8 to 1e4, plus
#: one bucket above. Log-spaced because gradient norms span orders of magnitude; fixed so that every
#: trainer's buckets line up in Prometheus and a quantile can aggregate across them.
HISTOGRAM_BOUNDARIES: tuple[float, ...] = tuple(10.0 ** (k / 4) for k in range(-32, 17))

#: The value each bucket's count is recorded at when exported: its upper bound; the bucket above the last
#: bound at a quarter decade past it (any value above).
BUCKET_VALUES: tuple[float, ...] = (*HISTOGRAM_BOUNDARIES, HISTOGRAM_BOUNDARIES[-1] * 10**0.25)

#: The exported histogram's bucket bounds per TOLARIA_SEED_STEP_NORM_HISTOGRAM: a subset of the fine bounds the
#: device counts in (each fine count is recorded at its upper bound, so a coarse bucket's count is exact).
#: coarse: one bucket per decade, 1e-8 to 1e4 (13 bounds, 14 buckets); fine: four per decade (49 bounds).
STEP_NORM_BOUNDARIES: dict[str, tuple[float, ...]] = {
    "coarse": HISTOGRAM_BOUNDARIES[::4],
    "fine": HISTOGRAM_BOUNDARIES,
}

#: The resolutions TOLARIA_SEED_STEP_NORM_HISTOGRAM accepts: those above, and "off" (no histogram exported).
STEP_NORM_HISTOGRAMS = (*STEP_NORM_BOUNDARIES, "off")


def exported_buckets(resolution: str) -> int:
    """Exported buckets of the histogram at ``resolution`` (the one above the last bound included); 0 when off."""
    boundaries = STEP_NORM_BOUNDARIES.get(resolution)
    return 0 if boundaries is None else len(boundaries) + 1
