"""Releasing the OpenTelemetry SDK's state for attribute sets the package no longer observes.

The SDK (1.30 to at least 1.45) keeps one aggregation per attribute set an asynchronous instrument
ever observed, for the life of the process, and counts them against the stream's cardinality limit.
A gauge's aggregation holds nothing once its value is collected, so dropping the idle ones loses
nothing and keeps memory and cardinality bounded by what is observed now. There is no public API
for it; this module is the one place that reaches into the SDK, and it says so (returns False)
when the SDK's internals are not the ones it knows, leaving the state untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any


def release_idle_attribute_sets(instruments: Iterable[Any], keep: Callable[[Mapping[str, Any]], bool]) -> bool:
    """Drop every aggregation of ``instruments`` whose attributes ``keep`` rejects, in every reader.

    Returns False when an instrument is an SDK one but its internals are not as expected; True
    otherwise (an API no-op instrument has no state to release).
    """
    for instrument in instruments:
        consumer = getattr(instrument, "_measurement_consumer", None)
        if consumer is None:
            if type(instrument).__module__.startswith("opentelemetry.sdk"):
                return False
            continue  # the API's no-op or proxy instruments hold no state
        try:
            storages = list(consumer._reader_storages.values())
            matches = [match for storage in storages
                       for match in storage._instrument_view_instrument_matches.get(instrument, ())]
            for match in matches:
                with match._lock:
                    # A new dict rather than deletions: a collection may be iterating the old one.
                    match._attributes_aggregation = {
                        key: aggregation for key, aggregation in match._attributes_aggregation.items()
                        if keep(aggregation._attributes or {})}
        except AttributeError:
            return False
    return True
