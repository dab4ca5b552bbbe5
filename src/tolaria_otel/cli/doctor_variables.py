"""The variables ``doctor`` shows, with their defaults, and which of them the settings in force read."""

from __future__ import annotations

import os
from collections.abc import Mapping

from ..config import otel_env as otel
from ..config.environment import value as env_value
from ..config.settings import ENV_ENABLED, VARIABLE_FIELDS, SeedLayerSettings
from .common import or_none

#: The OTEL_* variables that shape this package's export, with the default each falls back to.
OTEL_DEFAULTS = {
    "OTEL_SDK_DISABLED": "false",
    "OTEL_METRICS_EXPORTER": "otlp",
    "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
    "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_ENDPOINT": "http://localhost:4318 (grpc: http://localhost:4317)",
    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "OTEL_EXPORTER_OTLP_ENDPOINT + /v1/metrics (grpc: as is)",
    "OTEL_EXPORTER_OTLP_HEADERS": "none",
    "OTEL_EXPORTER_OTLP_METRICS_HEADERS": "OTEL_EXPORTER_OTLP_HEADERS",
    "OTEL_EXPORTER_OTLP_TIMEOUT": "10 (seconds in the Python SDK)",
    "OTEL_EXPORTER_OTLP_METRICS_TIMEOUT": "OTEL_EXPORTER_OTLP_TIMEOUT",
    "OTEL_EXPORTER_OTLP_COMPRESSION": "none",
    "OTEL_EXPORTER_OTLP_METRICS_COMPRESSION": "OTEL_EXPORTER_OTLP_COMPRESSION",
    "OTEL_EXPORTER_OTLP_CERTIFICATE": "the system's CAs",
    "OTEL_EXPORTER_OTLP_METRICS_CERTIFICATE": "OTEL_EXPORTER_OTLP_CERTIFICATE",
    "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE": "none (no mutual TLS)",
    "OTEL_EXPORTER_OTLP_METRICS_CLIENT_CERTIFICATE": "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
    "OTEL_EXPORTER_OTLP_CLIENT_KEY": "none (no mutual TLS)",
    "OTEL_EXPORTER_OTLP_METRICS_CLIENT_KEY": "OTEL_EXPORTER_OTLP_CLIENT_KEY",
    "OTEL_METRIC_EXPORT_INTERVAL": "60000 (ms)",
    "OTEL_METRIC_EXPORT_TIMEOUT": "30000 (ms)",
    "OTEL_SERVICE_NAME": "tolaria",
    "OTEL_RESOURCE_ATTRIBUTES": "none",
    "OTEL_EXPORTER_PROMETHEUS_HOST": "localhost",
    "OTEL_EXPORTER_PROMETHEUS_PORT": "9464",
}
CLIENT_TLS_VARIABLES = (
    otel.ENV_CLIENT_CERTIFICATE,
    otel.ENV_METRICS_CLIENT_CERTIFICATE,
    otel.ENV_CLIENT_KEY,
    otel.ENV_METRICS_CLIENT_KEY,
)
TLS_VARIABLES = (otel.ENV_CERTIFICATE, otel.ENV_METRICS_CERTIFICATE, *CLIENT_TLS_VARIABLES)
#: The OTLP variables, each with the metrics-specific one that overrides it.
OTLP_PAIRS = {
    otel.ENV_PROTOCOL: otel.ENV_METRICS_PROTOCOL,
    otel.ENV_ENDPOINT: otel.ENV_METRICS_ENDPOINT,
    otel.ENV_HEADERS: otel.ENV_METRICS_HEADERS,
    otel.ENV_TIMEOUT: otel.ENV_METRICS_TIMEOUT,
    otel.ENV_COMPRESSION: otel.ENV_METRICS_COMPRESSION,
    otel.ENV_CERTIFICATE: otel.ENV_METRICS_CERTIFICATE,
    otel.ENV_CLIENT_CERTIFICATE: otel.ENV_METRICS_CLIENT_CERTIFICATE,
    otel.ENV_CLIENT_KEY: otel.ENV_METRICS_CLIENT_KEY,
}


class InForce:
    """What the OTEL_* settings in force choose, each part None where its variable is bad."""

    def __init__(self, disabled: bool, exporters: list[str], protocol: str | None, endpoint: str | None) -> None:
        self.disabled = disabled
        self.exporters = exporters
        self.protocol = protocol
        self.endpoint = endpoint

    @classmethod
    def read(cls, env: Mapping[str, str]) -> InForce:
        disabled = or_none(lambda: otel.sdk_disabled(env)) is True
        exporters = or_none(lambda: otel.exporter_names(env)) or []
        protocol = or_none(lambda: otel.otlp_protocol(env))
        endpoint = or_none(lambda: otel.otlp_metrics_endpoint(env, protocol)) if protocol else None
        return cls(disabled, exporters, protocol, endpoint)

    def unused(self, name: str, settings: SeedLayerSettings) -> str | None:
        """Why the settings in force do not read ``name``, or None when they do."""
        env = os.environ
        if name in VARIABLE_FIELDS:
            return None if settings.enabled or name == ENV_ENABLED else f"{ENV_ENABLED} is off"
        if name == otel.ENV_SDK_DISABLED:
            return None
        if self.disabled:
            return f"{otel.ENV_SDK_DISABLED}=true"
        if name in OTLP_PAIRS or name in OTLP_PAIRS.values():
            if "otlp" not in self.exporters:
                return "no otlp exporter"
            if name in OTLP_PAIRS and env_value(env, OTLP_PAIRS[name]) is not None:
                return f"{OTLP_PAIRS[name]} is set"
            if name in TLS_VARIABLES and not (self.endpoint or "").startswith("https:"):
                return "the endpoint is not https"
        if name in (otel.ENV_EXPORT_INTERVAL, otel.ENV_EXPORT_TIMEOUT) and not {"otlp", "console"} & set(
            self.exporters
        ):
            return "no periodic exporter (otlp, console)"
        if name in (otel.ENV_PROMETHEUS_HOST, otel.ENV_PROMETHEUS_PORT) and "prometheus" not in self.exporters:
            return "no prometheus exporter"
        return None
