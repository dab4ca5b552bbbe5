"""Telemetry trouble, counted and logged, never raised: training goes on without the measurement."""

from __future__ import annotations

import logging
import sys

_logger = logging.getLogger("tolaria_otel.telemetry")  # the logger users filter on, whichever part failed


class FailureLog:
    """Called from an ``except`` block: counts the failure and logs it, the first of each kind (where it
    happened and the exception's type) as a warning with its traceback, the repeats at debug level, so a
    failure at every step does not flood the log."""

    def __init__(self) -> None:
        self.count = 0
        self._reported: set[tuple[str, type]] = set()

    def __call__(self, where: str) -> None:
        self.count += 1
        kind = (where, type(sys.exc_info()[1]))
        first = kind not in self._reported
        self._reported.add(kind)
        _logger.log(
            logging.WARNING if first else logging.DEBUG,
            "tolaria_otel: %s failed; training goes on without this measurement",
            where,
            exc_info=first,
        )
