"""Reading the environment: the one reader every ``TOLARIA_*`` and ``OTEL_*`` value and the command line's
numbers go through, so blank, integer and number mean the same everywhere.

Blank counts as unset (the OpenTelemetry specification's rule, kept for the ``TOLARIA_*`` variables too). An
integer is plain decimal digits (``int()`` would also take ``1_000`` and ``+3``); a number is what ``float()``
reads, NaN when it reads nothing. A bad value is echoed in an error message at most :data:`ECHO_MAX`
characters long: a variable can hold anything (a pasted file, a 100 kB token).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

Environ = Mapping[str, str]

#: The variables that set the OTLP endpoint (URLs, whose secrets are masked wherever they are shown).
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
#: What separates the entries of ``OTEL_EXPORTER_OTLP_HEADERS`` (the exporters split on it the same way).
HEADER_DELIMITER = re.compile(r"[ \t]*,[ \t]*")

#: Characters of a bad value that an error message echoes; a longer value is cut and its length given.
ECHO_MAX = 40


def value(env: Environ, name: str) -> str | None:
    """The variable's value; empty or blank counts as unset."""
    raw = env.get(name)
    return raw if raw is not None and raw.strip() else None


def integer(raw: str, minimum: int, maximum: int) -> int | None:
    """``raw`` as an integer from ``minimum`` to ``maximum``, or None when it is not one (plain digits only)."""
    text = raw.strip()
    # Digits beyond the maximum's are out of range, and int() refuses more than 4300 of them.
    if not text.isascii() or not text.isdigit() or len(text.lstrip("0")) > len(str(maximum)):
        return None
    number = int(text)
    return number if minimum <= number <= maximum else None


def number(raw: str) -> float:
    """``raw`` as a float, NaN when it is not a number."""
    try:
        return float(raw.strip())
    except ValueError:
        return math.nan


def positive_number(raw: str) -> float | None:
    """``raw`` as a finite number above 0, or None when it is not one (``inf`` would mean never, ``0`` nothing)."""
    value = number(raw)
    return value if math.isfinite(value) and value > 0 else None


def echoed(shown: object) -> str:
    """``repr(shown)`` for an error message, cut to :data:`ECHO_MAX` characters of the value."""
    if not isinstance(shown, str):
        text = repr(shown)
        return text if len(text) <= ECHO_MAX else f"{text[:ECHO_MAX]}... ({len(text)} characters of repr)"
    return repr(shown) if len(shown) <= ECHO_MAX else f"{shown[:ECHO_MAX]!r}... ({len(shown)} characters)"
