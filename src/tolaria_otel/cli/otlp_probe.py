"""Whether an OTLP endpoint answers as a receiver would, and what to try when it does not.

``doctor`` probes the endpoint in force; ``demo`` probes the one it is about to export to, before it trains.
"""

from __future__ import annotations

import base64
import socket
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping

from ..config import otel_env as otel
from ..config.redaction import redacted_url

#: Seconds to wait for an endpoint's answer: the demo's, and ``doctor --timeout``'s default.
PROBE_TIMEOUT_S = 2.0
#: Where OTLP/HTTP receivers take metrics, tried when an endpoint answers with a client error.
KNOWN_OTLP_PATHS = {
    "/v1/metrics": "an OpenTelemetry Collector",
    "/opentelemetry/v1/metrics": "VictoriaMetrics",
    "/api/v1/otlp/v1/metrics": "Prometheus 3 with its OTLP receiver",
    "/otlp/v1/metrics": "Grafana Mimir",
}


def probe_otlp(
    endpoint: str,
    protocol: str,
    headers: Mapping[str, str],
    certificate: str | None,
    timeout: float,
    setting: str,
    client: tuple[str, str] | None = None,
) -> str | None:
    """None when the endpoint answers as a receiver would; otherwise why not and what to try, in one line.

    OTLP/HTTP gets an empty export request (a valid, empty protobuf message) with the export's
    headers, and user info in the URL as HTTP basic auth (as the exporter's ``requests`` sends it),
    so a wrong path or a refused token shows up too; over ``https`` it trusts ``certificate`` (a CA file, or
    the system's CAs) and shows ``client`` (certificate and key files) as the exporter does, so a receiver
    that requires mutual TLS answers too. gRPC gets a TCP connection. ``setting`` is where the user sets
    the endpoint, for the advice.
    """
    shown = redacted_url(endpoint)
    parts = urllib.parse.urlsplit(endpoint)
    try:
        if protocol == "grpc":
            socket.create_connection((parts.hostname, parts.port or 4317), timeout=timeout).close()
            return None
        context = _tls_context(certificate, client) if parts.scheme == "https" else None
        status = _post_empty_export(endpoint, headers, context, timeout)
    except (OSError, ssl.SSLError) as error:
        reason = error.reason if isinstance(error, urllib.error.URLError) else error
        return f"OTLP endpoint {shown} does not answer: {reason}"
    if status is None:
        return None
    if status[0] in (401, 403):
        return (
            f"OTLP endpoint {shown} answered HTTP {status[0]} {status[1]}: the receiver refused the "
            f"credentials; check {otel.ENV_HEADERS} (or the URL's user info)"
        )
    tail = ""
    if 400 <= status[0] < 500:
        found = _answering_path(endpoint, headers, context, timeout)
        if found:
            alternative, what = found
            tail = f"; {redacted_url(alternative)} answers ({what}'s OTLP path): try {_set(setting, alternative)}"
        else:
            tail = (
                f": no OTLP/HTTP metrics receiver at that path; try the receiver's full URL in {setting} "
                "(a Collector: http://HOST:4318/v1/metrics; VictoriaMetrics: http://HOST:8428/opentelemetry/v1/metrics)"
            )
    return f"OTLP endpoint {shown} answered HTTP {status[0]} {status[1]}{tail}"


def _tls_context(certificate: str | None, client: tuple[str, str] | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=certificate)
    if client is not None:
        context.load_cert_chain(*client)
    return context


def _post_empty_export(
    endpoint: str, headers: Mapping[str, str], context: ssl.SSLContext | None, timeout: float
) -> tuple[int, str] | None:
    """POST an empty export request: None on success, else (HTTP status, reason). Raises OSError."""
    parts = urllib.parse.urlsplit(endpoint)
    sent = {**headers, "Content-Type": "application/x-protobuf"}
    if parts.username is not None or parts.password is not None:
        # urllib would take "user:pass@host" for the host; requests (the exporter) sends basic auth.
        credentials = f"{urllib.parse.unquote(parts.username or '')}:{urllib.parse.unquote(parts.password or '')}"
        sent["Authorization"] = "Basic " + base64.b64encode(credentials.encode("latin-1", "replace")).decode()
        endpoint = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
    request = urllib.request.Request(endpoint, data=b"", method="POST", headers=sent)
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context):
            return None
    except urllib.error.HTTPError as error:
        return error.code, str(error.reason)


def _answering_path(
    endpoint: str, headers: Mapping[str, str], context: ssl.SSLContext | None, timeout: float
) -> tuple[str, str] | None:
    """A well-known OTLP path on the same server that takes an empty export, with whose path it is."""
    parts = urllib.parse.urlsplit(endpoint)
    for path, what in KNOWN_OTLP_PATHS.items():
        if path == parts.path:
            continue
        candidate = parts._replace(path=path, query="", fragment="").geturl()
        try:
            if _post_empty_export(candidate, headers, context, timeout) is None:
                return candidate, what
        except OSError:
            return None
    return None


def _set(setting: str, url: str) -> str:
    return f"--otlp-endpoint {redacted_url(url)}" if setting.startswith("--") else f"{setting}={redacted_url(url)}"
