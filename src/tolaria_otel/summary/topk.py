"""Deterministic top-K selection of layers by gradient norm."""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping


def rank_key(item: tuple[str, float]) -> tuple[bool, float, str]:
    """Non-finite values (NaN, Inf) first, as the most urgent; then largest value; ties by name."""
    layer, value = item
    finite = math.isfinite(value)
    return (finite, -value if finite else 0.0, layer)


def top_k(values: Mapping[str, float], k: int) -> tuple[tuple[str, float], ...]:
    """The ``k`` highest-ranked ``(layer, value)`` pairs, in rank order. Same input, same output."""
    return tuple(heapq.nsmallest(k, values.items(), key=rank_key))
