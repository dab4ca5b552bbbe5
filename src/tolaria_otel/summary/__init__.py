"""The per-epoch summary Tamiyo reads in process: plain, typed, no torch (``from tolaria_otel import EpochSummary``).

``epoch_summary`` holds the types; the rest (the summary built from the epoch's sums, top-K, health) is internal.
"""

from ..config.histogram import HISTOGRAM_BOUNDARIES
from .epoch_summary import EpochSummary, SeedSummary

__all__ = ["HISTOGRAM_BOUNDARIES", "EpochSummary", "SeedSummary"]
