"""A seed's health in one epoch, from its summary: the thresholds Tamiyo and the alert rules share.

In order, the first that applies:

* ``not_measured``: no gradient reached the seed at any of its sampled steps;
* ``nonfinite``: some sampled step had a NaN or Inf norm (``nonfinite_steps`` says how many);
* ``exploding``: a layer's RMS above :data:`EXPLODING_ABOVE` (the alert TolariaSeedLayerGradientExploding's
  absolute branch), or a single step of the seed above :data:`SPIKE_ABOVE` times its RMS;
* ``vanishing``: every layer's RMS below :data:`VANISHING_BELOW` (TolariaSeedGradientVanishing);
* ``healthy``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

EXPLODING_ABOVE = 1000.0
VANISHING_BELOW = 1e-6
#: A step more than this many times the epoch's RMS: one step carried most of the epoch's gradient
#: (with N equal steps max/RMS is 1; one step alone among N gives sqrt(N)).
SPIKE_ABOVE = 10.0
HEALTH_STATES = ("not_measured", "nonfinite", "exploding", "vanishing", "healthy")


def classify(
    total_norm: float | None, max_norm: float | None, layer_norms: Iterable[float | None], nonfinite_steps: int
) -> str:
    """A seed's health from its summary's values (``SeedSummary.health``), before the summary is built."""
    if total_norm is None:
        return "not_measured"
    values = [v for v in layer_norms if v is not None]
    if nonfinite_steps or not all(math.isfinite(v) for v in (total_norm, *values)):
        return "nonfinite"
    if any(v > EXPLODING_ABOVE for v in values) or (
        max_norm is not None and total_norm > 0 and max_norm > SPIKE_ABOVE * total_norm
    ):
        return "exploding"
    if max(values, default=0.0) < VANISHING_BELOW:
        return "vanishing"
    return "healthy"
