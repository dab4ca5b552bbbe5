"""Secrets kept out of every line the package, and the OpenTelemetry exporters it builds, print.

Secrets live in the OTLP variables: header values (``OTEL_EXPORTER_OTLP_[METRICS_]HEADERS``), an endpoint's
user info (``https://user:password@host``, sent as HTTP basic auth) and its query string (``?api_key=...``).
The package's own output (``doctor``, errors) never shows them: :func:`redacted_url`, and headers are named
by position or by name only. The exporters' own log lines are another matter: the HTTP exporter's "Transient
error ... retrying" line carries the ``requests`` error, whose text has the request's path and query string;
the gRPC exporter's lines name its target; ``opentelemetry.util.re`` logs a malformed header whole.

Why a filter rather than refusing such endpoints: a query string has legitimate, non-secret uses
(VictoriaMetrics' ``?extra_label=``), and user info is a working way to give basic auth, so refusing them
would break deployments that work. Instead :func:`install_log_redaction` (called by
``configure_meter_provider``) puts a :class:`RedactingFilter` on the loggers of the exporters and the
libraries under them; it replaces every secret of the environment (in the forms a line may carry it: as
written, percent-decoded, and each longer run of letters and digits in it) and, whatever the environment,
any URL's user info and query string, by ``***``. What cannot be sent at all is refused at start instead
(``otel_env.environment_problems``): user info or a query string on a gRPC endpoint, a fragment anywhere.
"""

from __future__ import annotations

import logging
import os
import re
import urllib.parse
from collections.abc import Iterable, Mapping

from .environment import ENDPOINT_VARIABLES, HEADER_DELIMITER

MASK = "***"
#: The variables that may hold a secret: their values are never printed.
HEADER_VARIABLES = ("OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_METRICS_HEADERS")
#: The loggers that may print what the exporters send (a logger's filters see only its own records, not
#: its children's, so each is named): the OTLP exporters and their HTTP client, the header parser, the
#: periodic reader (which logs an export's exception with its traceback), requests and urllib3 below them.
EXPORTER_LOGGERS = (
    "opentelemetry.exporter.otlp.proto.http.metric_exporter",
    "opentelemetry.exporter.otlp.proto.http._common",
    "opentelemetry.exporter.otlp.common.http",
    "opentelemetry.exporter.http.transport._requests",
    "opentelemetry.exporter.otlp.proto.grpc.exporter",
    "opentelemetry.exporter.otlp.proto.grpc.metric_exporter",
    "opentelemetry.util.re",
    "opentelemetry.sdk.metrics._internal.export",
    "urllib3.connectionpool",
    "urllib3.util.retry",
    "requests",
)
#: Shorter runs of letters and digits are not redacted on their own (they would mangle every line);
#: a secret is caught whole, as written or percent-decoded.
FRAGMENT_MIN = 6
#: A value shorter than this is no credential (a header ``x-team=ml``, a query ``?v=1``), and masking every
#: "1" or "ml" would garble every line; it is not masked.
SECRET_MIN = 4

_URL_USER_INFO = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://)[^\s'\"<>]*@")
_QUERY = re.compile(r"(\S)\?[^\s'\"<>)]+")
_FRAGMENT_RUN = re.compile(rf"[A-Za-z0-9]{{{FRAGMENT_MIN},}}")


def redacted_url(url: str) -> str:
    """``url`` without what may be a secret, even when it does not parse: the user info (``https://TOKEN@host``,
    ``user:pass@``, a password with ``/``, ``?``, ``#`` or ``@`` in it) becomes ``***@``, a query or fragment
    ``?***``."""
    scheme, separator, rest = url.partition("://")
    if not separator:
        scheme, rest = "", url
    # The user info ends at the last "@": a password may hold "/", "?" or "#" that a URL parser would take for
    # the end of the authority (and so print the rest of it as a path).
    _user_info, at, rest = rest.rpartition("@")
    cut = min([i for i in (rest.find(c) for c in "/?#") if i >= 0] or [len(rest)])
    authority, tail = (f"{MASK}@" if at else "") + rest[:cut], rest[cut:]
    end = min([i for i in (tail.find("?"), tail.find("#")) if i >= 0] or [len(tail)])
    return f"{scheme}{separator}{authority}{tail[:end]}{'?' + MASK if end < len(tail) else ''}"


def secrets_in(environ: Mapping[str, str], fragments: bool = True) -> set[str]:
    """Every string of the OTLP variables in ``environ`` that may be a secret, as written and percent-decoded,
    and with ``fragments`` each run of :data:`FRAGMENT_MIN` or more letters and digits in it (a line may
    carry a secret re-encoded: ``requests`` quotes a query string its own way)."""
    found: set[str] = set()

    def add(value: str) -> None:
        forms = {value, urllib.parse.unquote(value), urllib.parse.unquote_plus(value)}
        found.update(forms)
        if fragments:
            found.update(run for form in forms for run in _FRAGMENT_RUN.findall(form))

    for variable in HEADER_VARIABLES:
        raw = environ.get(variable, "")
        found.update({raw.strip(), urllib.parse.unquote(raw.strip())})  # whole, so no name is left between masks
        for entry in HEADER_DELIMITER.split(raw):
            _, equals, value = entry.partition("=")
            add(value.strip() if equals else entry.strip())
    for variable in ENDPOINT_VARIABLES:
        raw = environ.get(variable, "").strip()
        rest = raw.partition("://")[2] or raw
        user_info, at, after = rest.rpartition("@")
        if at:
            add(user_info)
            for piece in user_info.split(":", 1):
                add(piece)
        for mark in "?#":
            _, question, query = after.partition(mark)
            if question:
                add(query)
                for pair in re.split(r"[&;#]", query):
                    add(pair.partition("=")[2])
    return {secret for secret in found if len(secret) >= SECRET_MIN}


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with each secret (longest first) and any URL's user info and query string masked."""
    for secret in sorted(set(secrets), key=len, reverse=True):
        text = text.replace(secret, MASK)
    text = _URL_USER_INFO.sub(rf"\1{MASK}@", text)
    return _QUERY.sub(rf"\1?{MASK}", text)


class RedactingFilter(logging.Filter):
    """Masks secrets in a record's message, its traceback and its stack (rewritten in place)."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a malformed call: show the template alone, never its arguments
            message = str(record.msg)
        record.msg, record.args = redact(message, self.secrets), None
        if record.exc_info and not record.exc_text:
            # Formatters use exc_text when it is set: the traceback is formatted once, here, and masked.
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, self.secrets)
        if record.stack_info:
            record.stack_info = redact(record.stack_info, self.secrets)
        return True


_FILTER = RedactingFilter()


def install_log_redaction(environ: Mapping[str, str] | None = None) -> RedactingFilter:
    """Mask the secrets of ``environ`` (default ``os.environ``) in the exporters' log lines, from now on.

    Idempotent; the secrets of every call are kept (several providers may be built from different
    environments). ``configure_meter_provider`` calls it; call it yourself before building your own
    exporter from the same variables.
    """
    _FILTER.secrets |= secrets_in(os.environ if environ is None else environ)
    for name in EXPORTER_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    return _FILTER
