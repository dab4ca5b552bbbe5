"""The two places the package reaches into the OpenTelemetry SDK: releasing the state of attribute
sets it no longer observes, and recording many equal histogram values at once.

The SDK (1.30 to at least 1.45) keeps one aggregation per attribute set an asynchronous instrument
ever observed, for the life of the process, and counts them against the stream's cardinality limit.
A gauge's aggregation holds nothing once its value is collected, so dropping the idle ones loses
nothing and keeps memory and cardinality bounded by what is observed now. There is no public API
for it; this module is the one place that reaches into the SDK, and it says so (returns False)
when the SDK's internals are not the ones it knows, leaving the state untouched.
"""

from __future__ import annotations

import bisect
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


def record_counts(histogram: Any, attributes: Mapping[str, Any], counts: Iterable[tuple[float, int]]) -> None:
    """Record ``count`` measurements of ``value`` for each pair, as ``count`` calls of ``record`` would.

    The API records one value per call, and an epoch of many steps would make that many calls per seed
    at its end. On the SDK, the measurements go into the aggregation's buckets, sum, min and max
    directly, under its lock (one ``record`` first creates the aggregation of new attributes); where that
    is not possible, the remaining calls are made.
    """
    pairs = [(value, count) for value, count in counts if count > 0]
    if not pairs or _add_to_buckets(histogram, attributes, pairs):
        return
    first, count = pairs[0]
    histogram.record(first, attributes)
    rest = [(first, count - 1), *pairs[1:]] if count > 1 else pairs[1:]
    if rest and not _add_to_buckets(histogram, attributes, rest):
        for value, times in rest:
            for _ in range(times):
                histogram.record(value, attributes)


def _add_to_buckets(histogram: Any, attributes: Mapping[str, Any], counts: list[tuple[float, int]]) -> bool:
    try:
        storages = list(histogram._measurement_consumer._reader_storages.values())
        aggregations = []
        for storage in storages:
            for match in storage._instrument_view_instrument_matches.get(histogram, ()):
                found = [a for a in match._attributes_aggregation.values() if a._attributes == attributes]
                if len(found) != 1 or not hasattr(found[0], "_boundaries"):
                    return False  # nothing adjusted yet: the caller records the rest one by one
                aggregations.append(found[0])
        if storages and not aggregations:  # the SDK has not seen the instrument yet (no reader: nothing to add)
            return False
        for aggregation in aggregations:
            with aggregation._lock:
                if aggregation._value is None:  # collected since the record() above
                    aggregation._value = aggregation._get_empty_bucket_counts()
                for value, count in counts:
                    aggregation._value[bisect.bisect_left(aggregation._boundaries, value)] += count
                    aggregation._sum += value * count
                    if aggregation._record_min_max:
                        aggregation._min = min(aggregation._min, value)
                        aggregation._max = max(aggregation._max, value)
    except AttributeError:
        return False
    return True
