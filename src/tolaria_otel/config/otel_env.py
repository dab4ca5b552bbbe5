"""The ``OTEL_*`` contract this package reads, as :mod:`tolaria_otel.settings` is the ``TOLARIA_*`` one: the
variables' names and defaults, one reader per variable that validates it, and :func:`environment_problems`, the
checks the provider and ``tolaria-otel doctor`` share.

The exporters read their own variables (``OTEL_EXPORTER_OTLP_*``: endpoint, headers, timeout,
compression, certificate; ``OTEL_METRIC_EXPORT_INTERVAL`` and ``OTEL_METRIC_EXPORT_TIMEOUT``;
``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES`` through ``Resource.create``). This module
first checks every value the chosen exporters will read (:func:`environment_problems`): the SDK takes a
malformed value for its default with a logged warning (which prints a malformed header, secret and all), or
takes a value that never exports (``OTEL_METRIC_EXPORT_INTERVAL=inf``, a zero timeout) without a
word. Here a bad value fails at start, naming the variable and what is accepted; an error never
shows a header value, a URL's user info or its query string, and echoes at most a short prefix
of any other value. The exporters' own log lines are masked too (:mod:`tolaria_otel.redaction`).

TLS: the exporters read ``OTEL_EXPORTER_OTLP_[METRICS_]CERTIFICATE`` (the CA to trust) and, for mutual
TLS, ``_CLIENT_CERTIFICATE`` and ``_CLIENT_KEY`` themselves; :func:`otlp_client_certificate` checks the
pair as the chosen exporter will read it (the gRPC exporter ignores a client certificate without a CA
file, and mixes no metrics-specific variable with a general one).
"""

from __future__ import annotations

import importlib.util
import os
import re
import urllib.parse
from collections.abc import Callable

from opentelemetry.util.re import parse_env_headers

from .environment import HEADER_DELIMITER, Environ, echoed, positive_number
from .environment import value as env_value
from .redaction import redacted_url

ENV_SDK_DISABLED = "OTEL_SDK_DISABLED"
ENV_EXPORTER = "OTEL_METRICS_EXPORTER"
ENV_PROTOCOL = "OTEL_EXPORTER_OTLP_PROTOCOL"
ENV_METRICS_PROTOCOL = "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL"
ENV_ENDPOINT = "OTEL_EXPORTER_OTLP_ENDPOINT"
ENV_METRICS_ENDPOINT = "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"
ENV_HEADERS = "OTEL_EXPORTER_OTLP_HEADERS"
ENV_METRICS_HEADERS = "OTEL_EXPORTER_OTLP_METRICS_HEADERS"
ENV_TIMEOUT = "OTEL_EXPORTER_OTLP_TIMEOUT"
ENV_METRICS_TIMEOUT = "OTEL_EXPORTER_OTLP_METRICS_TIMEOUT"
ENV_COMPRESSION = "OTEL_EXPORTER_OTLP_COMPRESSION"
ENV_METRICS_COMPRESSION = "OTEL_EXPORTER_OTLP_METRICS_COMPRESSION"
ENV_CERTIFICATE = "OTEL_EXPORTER_OTLP_CERTIFICATE"
ENV_METRICS_CERTIFICATE = "OTEL_EXPORTER_OTLP_METRICS_CERTIFICATE"
ENV_CLIENT_CERTIFICATE = "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE"
ENV_METRICS_CLIENT_CERTIFICATE = "OTEL_EXPORTER_OTLP_METRICS_CLIENT_CERTIFICATE"
ENV_CLIENT_KEY = "OTEL_EXPORTER_OTLP_CLIENT_KEY"
ENV_METRICS_CLIENT_KEY = "OTEL_EXPORTER_OTLP_METRICS_CLIENT_KEY"
ENV_EXPORT_INTERVAL = "OTEL_METRIC_EXPORT_INTERVAL"
ENV_EXPORT_TIMEOUT = "OTEL_METRIC_EXPORT_TIMEOUT"
ENV_SERVICE_NAME = "OTEL_SERVICE_NAME"
ENV_RESOURCE_ATTRIBUTES = "OTEL_RESOURCE_ATTRIBUTES"
ENV_PROMETHEUS_HOST = "OTEL_EXPORTER_PROMETHEUS_HOST"
ENV_PROMETHEUS_PORT = "OTEL_EXPORTER_PROMETHEUS_PORT"

EXPORTERS = ("otlp", "prometheus", "console", "none")
PROTOCOLS = ("http/protobuf", "grpc")
COMPRESSIONS = ("none", "gzip", "deflate")
DEFAULT_SERVICE_NAME = "tolaria"
DEFAULT_HTTP_ENDPOINT = "http://localhost:4318"
DEFAULT_GRPC_ENDPOINT = "http://localhost:4317"
DEFAULT_OTLP_TIMEOUT_S = 10.0
DEFAULT_EXPORT_INTERVAL_MS = 60_000.0
DEFAULT_EXPORT_TIMEOUT_MS = 30_000.0
DEFAULT_PROMETHEUS_HOST = "localhost"
DEFAULT_PROMETHEUS_PORT = 9464

# The liberal header syntax of opentelemetry.util.re, which the OTLP exporters parse with: an entry
# that does not match it is logged, value included, and dropped.
_HEADER_ENTRY = re.compile(
    r"[ \t]*[\x21\x23-\x27\x2a\x2b\x2d\x2e\x30-\x39\x41-\x5a\x5e-\x7a\x7c\x7e]+[ \t]*=[ \t]*"
    r"[\x20\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]*[ \t]*"
)

#: Letters, digits, hyphens (and the underscores some internal names have) in dot-separated labels.
_HOST_NAME = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?")


class ConfigurationError(ValueError):
    """An ``OTEL_*`` value this package reads is not one it accepts, or its exporter is not installed."""


def environment_problems(environ: Environ | None = None) -> list[ConfigurationError]:
    """Every ``OTEL_*`` value in force that the SDK would misread, one error per variable.

    Only what the settings in force read is checked: nothing but ``OTEL_SDK_DISABLED`` when it is
    true, the ``OTEL_EXPORTER_OTLP_*`` variables only with the ``otlp`` exporter, and so on.
    """
    env = _environ(environ)
    problems: list[ConfigurationError] = []

    def check(read: Callable[[], object]) -> object | None:
        try:
            return read()
        except ConfigurationError as error:
            problems.append(error)
            return None

    if check(lambda: sdk_disabled(env)) is True:
        return problems
    exporters = check(lambda: exporter_names(env))
    exporters = exporters if isinstance(exporters, list) else []
    check(lambda: resource_attributes(env))
    if "otlp" in exporters:
        protocol = check(lambda: otlp_protocol(env))
        if isinstance(protocol, str):
            endpoint = check(lambda: otlp_metrics_endpoint(env, protocol))
            if isinstance(endpoint, str) and endpoint.startswith("https:"):
                check(lambda: otlp_certificate(env))
                check(lambda: otlp_client_certificate(env, protocol))
            if protocol == "grpc" and importlib.util.find_spec("opentelemetry.exporter.otlp.proto.grpc") is None:
                problems.append(
                    ConfigurationError("OTLP over grpc needs the exporter package: pip install 'tolaria-otel[grpc]'")
                )
        check(lambda: otlp_headers(env))
        check(lambda: otlp_timeout_s(env))
        check(lambda: otlp_compression(env))
    if "otlp" in exporters or "console" in exporters:
        check(lambda: export_interval_ms(env))
        check(lambda: export_timeout_ms(env))
    if "prometheus" in exporters:
        check(lambda: prometheus_address(env))
        if importlib.util.find_spec("opentelemetry.exporter.prometheus") is None:
            problems.append(
                ConfigurationError(
                    f"{ENV_EXPORTER}=prometheus needs the exporter package: pip install 'tolaria-otel[prometheus]'"
                )
            )
    return problems


def sdk_disabled(environ: Environ | None = None) -> bool:
    """``OTEL_SDK_DISABLED``: true or false. The SDK reads any other word as false, so ``1`` would
    leave the SDK on; it is refused here instead."""
    raw = env_value(_environ(environ), ENV_SDK_DISABLED)
    if raw is None:
        return False
    word = raw.strip().lower()
    if word not in ("true", "false"):
        raise ConfigurationError(
            f"{ENV_SDK_DISABLED}={echoed(raw)} is not valid: expected true or false "
            "(the SDK reads any other value as false)"
        )
    return word == "true"


def exporter_names(environ: Environ | None = None) -> list[str]:
    """``OTEL_METRICS_EXPORTER`` as a validated list (default ``otlp``, as the specification says)."""
    raw = _environ(environ).get(ENV_EXPORTER, "")
    names = [name.strip().lower() for name in raw.split(",") if name.strip()] or ["otlp"]
    for name in names:
        if name not in EXPORTERS:
            raise ConfigurationError(
                f"{ENV_EXPORTER}={echoed(raw)} is not valid: expected a comma-separated list of {', '.join(EXPORTERS)}"
            )
    if "none" in names and len(names) > 1:
        raise ConfigurationError(f"{ENV_EXPORTER}={echoed(raw)} is not valid: 'none' cannot be combined with others")
    return [name for name in names if name != "none"]


def otlp_protocol(environ: Environ | None = None) -> str:
    """The OTLP protocol for metrics (default ``http/protobuf``, as the specification says)."""
    env = _environ(environ)
    for variable in (ENV_METRICS_PROTOCOL, ENV_PROTOCOL):
        raw = env.get(variable, "").strip()
        if raw:
            if raw.lower() not in PROTOCOLS:
                raise ConfigurationError(
                    f"{variable}={echoed(raw)} is not valid: expected one of {', '.join(PROTOCOLS)}"
                )
            return raw.lower()
    return "http/protobuf"


def otlp_metrics_endpoint(environ: Environ | None = None, protocol: str | None = None) -> str:
    """The URL the OTLP metric exporter sends to, resolved as the exporter resolves it, and checked."""
    env = _environ(environ)
    protocol = otlp_protocol(env) if protocol is None else protocol
    specific = env_value(env, ENV_METRICS_ENDPOINT)
    base = env_value(env, ENV_ENDPOINT)
    if specific is not None:
        variable, raw, url = ENV_METRICS_ENDPOINT, specific, specific.strip()
    elif protocol == "grpc":
        variable, raw, url = ENV_ENDPOINT, base or "", (base or DEFAULT_GRPC_ENDPOINT).strip()
    else:
        variable, raw = ENV_ENDPOINT, base or ""
        url = f"{(base or DEFAULT_HTTP_ENDPOINT).strip().removesuffix('/')}/v1/metrics"
    # The base URL is checked before the path is added: 'http://' + '/v1/metrics' would name a host "v1".
    problem = url_problem(raw.strip()) if raw else url_problem(url)
    if problem is None:
        problem = _unsent_part(url, protocol)
    if problem is None and variable == ENV_ENDPOINT and protocol != "grpc" and "?" in raw:
        problem = (
            f"a query string here ends up before the /v1/metrics the exporter appends; give the full URL, "
            f"query included, in {ENV_METRICS_ENDPOINT}"
        )
    if problem:
        raise ConfigurationError(
            f"{variable}={echoed(redacted_url(raw))} is not valid: {problem}; expected "
            "http://host:port or https://host:port, with a path where the receiver needs one"
        )
    return url


def otlp_headers(environ: Environ | None = None) -> dict[str, str]:
    """The export headers (``OTEL_EXPORTER_OTLP_METRICS_HEADERS`` or else ``OTEL_EXPORTER_OTLP_HEADERS``)."""
    found = _in_force(_environ(environ), ENV_METRICS_HEADERS, ENV_HEADERS)
    if found is None:
        return {}
    variable, raw = found
    # Split, matched and decoded as the exporters do (opentelemetry.util.re.parse_env_headers, liberal: an
    # entry that is not percent-encoded is taken as written), so that what is checked is what is sent.
    entries = [entry for entry in HEADER_DELIMITER.split(raw) if entry]
    for number, entry in enumerate(entries, 1):
        problem = None
        if not _HEADER_ENTRY.fullmatch(entry.strip()):
            problem = "is not name=value in printable ASCII"
        elif not entry.partition("=")[2].strip(" \t="):
            # 'authorization=Basic X,Y==': the exporter splits at every comma and would send a header "y".
            problem = "has an empty value (or only '='): a comma inside a value must be percent-encoded as %2C"
        if problem:
            raise ConfigurationError(
                f"{variable} is not valid: entry {number} of {len(entries)} {problem} (not shown: it may hold a "
                "secret); expected comma-separated name=value pairs, special characters URL-encoded, "
                "e.g. authorization=Bearer%20TOKEN"
            )
    return dict(parse_env_headers(raw, liberal=True))


def otlp_timeout_s(environ: Environ | None = None) -> float:
    """The export timeout in seconds: the Python exporters read seconds, not the specification's ms."""
    found = _in_force(_environ(environ), ENV_METRICS_TIMEOUT, ENV_TIMEOUT)
    if found is None:
        return DEFAULT_OTLP_TIMEOUT_S
    variable, raw = found
    value = positive_number(raw)
    if value is None:
        raise ConfigurationError(
            f"{variable}={echoed(raw)} is not valid: expected a positive number of seconds "
            "(the Python SDK reads seconds), e.g. 2"
        )
    return value


def otlp_compression(environ: Environ | None = None) -> str:
    found = _in_force(_environ(environ), ENV_METRICS_COMPRESSION, ENV_COMPRESSION)
    if found is None:
        return "none"
    variable, raw = found
    if raw.strip().lower() not in COMPRESSIONS:
        raise ConfigurationError(f"{variable}={echoed(raw)} is not valid: expected one of {', '.join(COMPRESSIONS)}")
    return raw.strip().lower()


def otlp_certificate(environ: Environ | None = None) -> str | None:
    """The CA file for an ``https://`` endpoint; the SDK finds a missing one only at each export."""
    found = _in_force(_environ(environ), ENV_METRICS_CERTIFICATE, ENV_CERTIFICATE)
    if found is None:
        return None
    variable, raw = found
    if not (os.path.isfile(raw) and os.access(raw, os.R_OK)):
        raise ConfigurationError(
            f"{variable}={echoed(raw)} is not valid: not a readable file; expected the path "
            "of a PEM file of CA certificates"
        )
    return raw


def otlp_client_certificate(environ: Environ | None = None, protocol: str | None = None) -> tuple[str, str] | None:
    """The client certificate and key for mutual TLS, as the ``protocol``'s exporter will read them, or None.

    OTLP/HTTP takes each of ``OTEL_EXPORTER_OTLP_METRICS_CLIENT_CERTIFICATE`` / ``_CLIENT_KEY`` or else the
    general one. The gRPC exporter reads the metrics-specific three (CA, certificate, key) when
    ``OTEL_EXPORTER_OTLP_METRICS_CERTIFICATE`` is set and the general three otherwise, and a client
    certificate only together with a CA file: what it would ignore is refused here.
    """
    env = _environ(environ)
    protocol = otlp_protocol(env) if protocol is None else protocol
    general = (ENV_CERTIFICATE, ENV_CLIENT_CERTIFICATE, ENV_CLIENT_KEY)
    specific = (ENV_METRICS_CERTIFICATE, ENV_METRICS_CLIENT_CERTIFICATE, ENV_METRICS_CLIENT_KEY)
    if protocol == "grpc":
        used, ignored = (specific, general) if env_value(env, ENV_METRICS_CERTIFICATE) else (general, specific)
        for variable in ignored[1:]:
            if env_value(env, variable) is not None:
                raise ConfigurationError(
                    f"{variable} is not used: over grpc the exporter reads {used[1]} and {used[2]} (because "
                    f"{ENV_METRICS_CERTIFICATE} is {'set' if used is specific else 'not set'}); set those"
                )
        ca, cert_variable, key_variable = used
        given = [variable for variable in (cert_variable, key_variable) if env_value(env, variable) is not None]
        if given and env_value(env, ca) is None:
            raise ConfigurationError(
                f"{given[0]} is not used: over grpc the exporter sends a client certificate only when {ca} "
                "names the CA file to trust; set it (the system's CAs: /etc/ssl/certs/ca-certificates.crt)"
            )
    else:
        cert_variable = (
            ENV_METRICS_CLIENT_CERTIFICATE if env_value(env, ENV_METRICS_CLIENT_CERTIFICATE) else ENV_CLIENT_CERTIFICATE
        )
        key_variable = ENV_METRICS_CLIENT_KEY if env_value(env, ENV_METRICS_CLIENT_KEY) else ENV_CLIENT_KEY
    cert, key = env_value(env, cert_variable), env_value(env, key_variable)
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        missing, set_one = (cert_variable, key_variable) if cert is None else (key_variable, cert_variable)
        general_name = missing.replace("_OTLP_METRICS_", "_OTLP_")
        if protocol != "grpc":  # either spelling of the missing one would do
            missing = f"neither {general_name.replace('_OTLP_', '_OTLP_METRICS_')} nor {general_name} is set"
        else:
            missing = f"{missing} is not"
        raise ConfigurationError(
            f"{set_one} is set but {missing}: mutual TLS needs both, the client certificate "
            "(PEM) and its private key (PEM)"
        )
    for variable, path, what in ((cert_variable, cert, "certificate"), (key_variable, key, "private key")):
        if not (os.path.isfile(path) and os.access(path, os.R_OK)):
            raise ConfigurationError(
                f"{variable}={echoed(path)} is not valid: not a readable file; expected the "
                f"path of the client's {what} (PEM)"
            )
    return cert, key


def export_interval_ms(environ: Environ | None = None) -> float:
    return _milliseconds(_environ(environ), ENV_EXPORT_INTERVAL, DEFAULT_EXPORT_INTERVAL_MS)


def export_timeout_ms(environ: Environ | None = None) -> float:
    return _milliseconds(_environ(environ), ENV_EXPORT_TIMEOUT, DEFAULT_EXPORT_TIMEOUT_MS)


def resource_attributes(environ: Environ | None = None) -> None:
    """``OTEL_RESOURCE_ATTRIBUTES``: the SDK logs (value included) and drops an entry without ``=``."""
    raw = env_value(_environ(environ), ENV_RESOURCE_ATTRIBUTES)
    if raw is None:
        return
    entries = raw.split(",")
    for number, entry in enumerate(entries, 1):
        key, equals, _ = entry.partition("=")
        if not equals or not key.strip():
            raise ConfigurationError(
                f"{ENV_RESOURCE_ATTRIBUTES} is not valid: entry {number} of {len(entries)} is "
                "not key=value (not shown); expected comma-separated key=value pairs, "
                "e.g. service.instance.id=run-42"
            )


def prometheus_address(environ: Environ | None = None) -> tuple[str, int]:
    """Where pull mode serves ``/metrics``: (host, port). Whether it can listen there shows at start."""
    env = _environ(environ)
    host = (env_value(env, ENV_PROMETHEUS_HOST) or DEFAULT_PROMETHEUS_HOST).strip()
    raw_port = env_value(env, ENV_PROMETHEUS_PORT)
    if raw_port is None:
        return host, DEFAULT_PROMETHEUS_PORT
    text = raw_port.strip()
    if not (text.isascii() and text.isdigit() and len(text) <= 5 and int(text) <= 65535):
        raise ConfigurationError(
            f"{ENV_PROMETHEUS_PORT}={echoed(raw_port)} is not valid: expected a port from 0 to 65535 (0: a free one)"
        )
    return host, int(text)


def url_problem(url: str) -> str | None:
    """Why ``url`` cannot be an OTLP endpoint, or None."""
    if any(ord(char) <= 0x20 or ord(char) == 0x7F for char in url):
        return "it has a space or a control character"
    # A "/", "?" or "#" in a password ends the authority for every URL parser: the rest would be a path.
    encode = (
        " (a '/', '?', '#' or '@' in the user info must be percent-encoded: %2F, %3F, %23, %40)"
        if "@" in url.partition("://")[2]
        else ""
    )
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as error:  # 'http://[::1' (unclosed bracket), 'http://host:99999'
        return (
            "the port is not a number from 1 to 65535" if "Port" in str(error) else "it does not parse as a URL"
        ) + encode
    if parts.scheme not in ("http", "https"):
        return "the scheme is not http or https"
    if not parts.hostname:
        return "it has no host" + encode
    try:
        host = parts.hostname.encode("idna").decode("ascii")  # as the socket layer will: labels of 1 to 63
    except UnicodeError:
        return "the host name is not valid" + encode
    if not (_HOST_NAME.fullmatch(host) or ":" in host):  # a name, an IPv4 address, or an IPv6 one in brackets
        return "the host name is not valid" + encode
    if port == 0:
        return "the port is not a number from 1 to 65535"
    if "@" in parts.path + parts.query + parts.fragment and "@" not in parts.netloc:
        return "the host ends before an '@'" + encode  # 'http://user:1234/x@host': host "user", port 1234
    return None


def _unsent_part(url: str, protocol: str) -> str | None:
    """A part of a valid URL that the exporter would drop or misuse, silently (and perhaps log)."""
    parts = urllib.parse.urlsplit(url)
    if parts.fragment or url.endswith("#"):
        return "it has a fragment (#...), which is never sent"
    if protocol == "grpc" and (parts.username is not None or parts.query or "?" in url):
        return (
            "a gRPC endpoint takes no user info or query string (the gRPC exporter uses only host:port and "
            f"sends neither); give credentials as a header in {ENV_METRICS_HEADERS} or {ENV_HEADERS}, "
            "e.g. authorization=Bearer%20TOKEN"
        )
    return None


def _milliseconds(env: Environ, variable: str, default: float) -> float:
    raw = env_value(env, variable)
    if raw is None:
        return default
    value = positive_number(raw)
    if value is None:
        raise ConfigurationError(f"{variable}={echoed(raw)} is not valid: expected a positive number of milliseconds")
    return value


def _in_force(env: Environ, specific: str, general: str) -> tuple[str, str] | None:
    """(variable, value) of the metrics-specific variable, or else the general one, or None."""
    for variable in (specific, general):
        raw = env_value(env, variable)
        if raw is not None:
            return variable, raw
    return None


def _environ(environ: Environ | None) -> Environ:
    return os.environ if environ is None else environ
