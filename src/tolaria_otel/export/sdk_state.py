"""Where the package reaches into the OpenTelemetry SDK: releasing the state of attribute sets it no
longer observes, recording many equal histogram values at once, sizing the streams several trainers
share, and reading a provider's readers and whether it was shut down (to export each epoch).

The SDK (1.30 to at least 1.45; CI tests 1.35.0 and 1.45.2) keeps one aggregation per attribute set an
asynchronous instrument ever observed, for the life of the process, and (1.45.2 on) counts them against
the stream's cardinality limit.
A gauge's aggregation holds nothing once its value is collected, so dropping the idle ones loses
nothing and keeps memory and cardinality bounded by what is observed now. There is no public API
for it; this module is the one place that reaches into the SDK, and it says so (returns False)
when the SDK's internals are not the ones it knows, leaving the state untouched.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

#: What :func:`_consumer` returns for an SDK instrument whose internals are not the known ones.
_UNKNOWN = object()


def _consumer(instrument: Any) -> Any:
    """The SDK instrument's measurement consumer; None for the API's instruments (no state), or ``_UNKNOWN``."""
    consumer = getattr(instrument, "_measurement_consumer", None)
    if consumer is None and type(instrument).__module__.startswith("opentelemetry.sdk"):
        return _UNKNOWN
    return consumer


def release_idle_attribute_sets(instruments: Iterable[Any], keep: Callable[[Mapping[str, Any]], bool]) -> bool:
    """Drop every aggregation of ``instruments`` whose attributes ``keep`` rejects, in every reader.

    Returns False when an instrument is an SDK one but its internals are not as expected; True
    otherwise (an API no-op instrument has no state to release).
    """
    for instrument in instruments:
        consumer = _consumer(instrument)
        if consumer is _UNKNOWN:
            return False
        if consumer is None:
            continue  # the API's no-op or proxy instruments hold no state
        try:
            storages = list(consumer._reader_storages.values())
            matches = [
                match
                for storage in storages
                for match in storage._instrument_view_instrument_matches.get(instrument, ())
            ]
            for match in matches:
                with match._lock:
                    # A new dict rather than deletions: a collection may be iterating the old one.
                    match._attributes_aggregation = {
                        key: aggregation
                        for key, aggregation in match._attributes_aggregation.items()
                        if keep(aggregation._attributes or {})
                    }
        except AttributeError:
            return False
    return True


def record_counts(
    histogram: Any, per_attributes: Iterable[tuple[Mapping[str, Any], Iterable[tuple[float, int]]]]
) -> None:
    """For each attribute set, record ``count`` measurements of ``value`` for each pair, as ``count`` calls of
    ``record`` would.

    The API records one value per call, and an epoch of many steps would make that many calls per seed
    at its end. On the SDK, the measurements go into the aggregation's buckets, sum, min and max
    directly, under its lock; an attribute set the SDK has not seen yet is created by one ``record``.
    The aggregations are found through one index of each reader's state built per call (twice when
    some attribute set is new), so S seeds cost O(S), not S scans of the state. Where the SDK's
    internals are not the known ones, the remaining calls are made.
    """
    todo = []
    for attributes, counts in per_attributes:
        pairs = [(value, count) for value, count in counts if count > 0]
        if pairs:
            todo.append((attributes, pairs))
    if not todo:
        return
    index = _index(histogram)
    created: set[int] = set()  # items whose first measurement a record() made
    if index is not None:
        new = [i for i, (attributes, _) in enumerate(todo) if _lookup(index, attributes) is None]
        for i in new:
            attributes, pairs = todo[i]
            histogram.record(pairs[0][0], attributes)
            created.add(i)
        if new:
            index = _index(histogram)
    for i, (attributes, counted) in enumerate(todo):
        pairs = counted
        if i in created:  # its first value is in already
            first, count = counted[0]
            pairs = [(first, count - 1), *counted[1:]] if count > 1 else counted[1:]
            if not pairs:
                continue
        aggregations = None if index is None else _lookup(index, attributes)
        if aggregations is None or not _add_to_buckets(aggregations, pairs):
            for value, times in pairs:
                for _ in range(times):
                    histogram.record(value, attributes)


_Index = tuple[list[dict[frozenset[tuple[str, Any]], Any]], bool]


def _index(histogram: Any) -> _Index | None:
    """Per reader (view match), the histogram's aggregations by attributes, and whether some reader has not
    seen the instrument yet; None when the SDK's internals are not the known ones."""
    try:
        by_attributes: list[dict[frozenset[tuple[str, Any]], Any]] = []
        unseen = False
        for storage in list(histogram._measurement_consumer._reader_storages.values()):
            matches = storage._instrument_view_instrument_matches.get(histogram)
            unseen |= not matches
            by_attributes.extend(
                {
                    frozenset((aggregation._attributes or {}).items()): aggregation
                    for aggregation in list(match._attributes_aggregation.values())
                }
                for match in matches or ()
            )
    except AttributeError:
        return None
    return by_attributes, unseen


def _lookup(index: _Index, attributes: Mapping[str, Any]) -> list[Any] | None:
    """The aggregations of ``attributes``, one per reader (none without a reader: nothing to add); None when
    some reader has none yet."""
    by_attributes, unseen = index
    if unseen:
        return None
    key = frozenset(attributes.items())
    found = [aggregations.get(key) for aggregations in by_attributes]
    return None if any(aggregation is None for aggregation in found) else found


def _add_to_buckets(aggregations: list[Any], counts: list[tuple[float, int]]) -> bool:
    try:
        if not all(hasattr(aggregation, "_boundaries") for aggregation in aggregations):
            return False  # not an explicit-bucket histogram's aggregation
        for aggregation in aggregations:
            with aggregation._lock:
                if aggregation._value is None:  # collected since it was created
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


def raise_cardinality_limits(instruments: Iterable[Any], limit: int) -> bool:
    """Raise the cardinality limit of every stream of ``instruments`` to at least ``limit``, in every reader.

    Several trainers share one stream per instrument on a provider (``instruments.ProviderStreams``), each with
    its own attribute sets; the views size a stream for one trainer. The streams are created here if the SDK
    has not made them yet (it makes them at the first measurement, with the views' limit, and would fold the
    points beyond it into its overflow series at once). Returns False when the internals are not the known ones.
    """
    for instrument in instruments:
        consumer = _consumer(instrument)
        if consumer is _UNKNOWN:
            return False
        if consumer is None:
            continue  # the API's no-op or proxy instruments hold no state
        try:
            for storage in list(consumer._reader_storages.values()):
                for match in storage._get_or_init_view_instrument_match(instrument):
                    with match._lock:
                        match._cardinality_limit = max(match._cardinality_limit, limit)
        except AttributeError:
            return False
    return True


def provider_readers(provider: Any) -> list[Any] | None:
    """The readers of an SDK ``MeterProvider`` (there is no public accessor): the keys of its measurement
    consumer's per-reader storage; None when not known."""
    try:
        return list(provider._measurement_consumer._reader_storages)
    except (AttributeError, TypeError):
        return None


def provider_shut_down(provider: Any) -> bool:
    """Whether ``shutdown()`` was called on an SDK ``MeterProvider`` (False when not known)."""
    return getattr(provider, "_shutdown", False) is True
