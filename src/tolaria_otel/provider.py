"""A ``MeterProvider`` built from the standard ``OTEL_*`` variables, with the package's views.

The exporters read their own variables (``OTEL_EXPORTER_OTLP_*``: endpoint, headers, timeout,
compression, certificate; ``OTEL_METRIC_EXPORT_INTERVAL`` and ``OTEL_METRIC_EXPORT_TIMEOUT``;
``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES`` through ``Resource.create``). This module
only chooses which exporters to build, as ``opentelemetry-instrument`` would, and validates the
choices it reads itself.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from opentelemetry.sdk.environment_variables import OTEL_SDK_DISABLED
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import SERVICE_NAME, Resource

from .distributed import distributed_resource, process_group
from .instruments import seed_layer_views
from .settings import SeedLayerSettings

ENV_EXPORTER = "OTEL_METRICS_EXPORTER"
ENV_PROTOCOL = "OTEL_EXPORTER_OTLP_PROTOCOL"
ENV_METRICS_PROTOCOL = "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL"
ENV_PROMETHEUS_HOST = "OTEL_EXPORTER_PROMETHEUS_HOST"
ENV_PROMETHEUS_PORT = "OTEL_EXPORTER_PROMETHEUS_PORT"

EXPORTERS = ("otlp", "prometheus", "console", "none")
PROTOCOLS = ("http/protobuf", "grpc")
DEFAULT_SERVICE_NAME = "tolaria"


class ConfigurationError(ValueError):
    """An ``OTEL_*`` value this package reads is not one it accepts, or its exporter is not installed."""


def configure_meter_provider(
    settings: SeedLayerSettings | None = None,
    *,
    resource: Resource | None = None,
    readers: Sequence[MetricReader] = (),
) -> MeterProvider:
    """The SDK ``MeterProvider`` the ``OTEL_*`` variables describe, with :func:`seed_layer_views`.

    ``readers`` are added to the ones the environment asks for (an ``InMemoryMetricReader`` in
    tests, say). The caller owns the result: call ``shutdown()`` on it at the end of training, so
    the last epoch is exported. Without ``resource``, the resource is the SDK's (``OTEL_SERVICE_NAME``,
    ``OTEL_RESOURCE_ATTRIBUTES``) plus, once ``torch.distributed`` is initialised, the rank and world
    size (:func:`tolaria_otel.distributed.distributed_resource`): build the provider after
    ``init_process_group``.
    """
    settings = SeedLayerSettings.from_env() if settings is None else settings
    views = seed_layer_views(settings)
    if _is_true(os.environ.get(OTEL_SDK_DISABLED, "")):
        return MeterProvider(views=views)  # the SDK hands out no-op meters
    if resource is None:
        resource = Resource.create()
        if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
            resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
        resource = resource.merge(distributed_resource())  # rank and world size under torch.distributed
    return MeterProvider(
        metric_readers=[*_readers_from_env(settings), *readers],
        resource=resource,
        views=views,
    )


def exporter_names(environ: dict[str, str] | os._Environ[str] | None = None) -> list[str]:
    """``OTEL_METRICS_EXPORTER`` as a validated list (default ``otlp``, as the specification says)."""
    env = os.environ if environ is None else environ
    raw = env.get(ENV_EXPORTER, "")
    names = [name.strip().lower() for name in raw.split(",") if name.strip()] or ["otlp"]
    for name in names:
        if name not in EXPORTERS:
            raise ConfigurationError(f"{ENV_EXPORTER}={raw!r} is not valid: expected a comma-separated list of "
                                     f"{', '.join(EXPORTERS)}")
    if "none" in names and len(names) > 1:
        raise ConfigurationError(f"{ENV_EXPORTER}={raw!r} is not valid: 'none' cannot be combined with others")
    return [name for name in names if name != "none"]


def otlp_protocol(environ: dict[str, str] | os._Environ[str] | None = None) -> str:
    """The OTLP protocol for metrics (default ``http/protobuf``, as the specification says)."""
    env = os.environ if environ is None else environ
    for variable in (ENV_METRICS_PROTOCOL, ENV_PROTOCOL):
        raw = env.get(variable, "").strip()
        if raw:
            if raw.lower() not in PROTOCOLS:
                raise ConfigurationError(f"{variable}={raw!r} is not valid: expected one of {', '.join(PROTOCOLS)}")
            return raw.lower()
    return "http/protobuf"


def _readers_from_env(settings: SeedLayerSettings) -> list[MetricReader]:
    builders: dict[str, Callable[[], MetricReader]] = {
        "otlp": lambda: PeriodicExportingMetricReader(_otlp_exporter()),
        "console": lambda: PeriodicExportingMetricReader(ConsoleMetricExporter()),
        "prometheus": _prometheus_reader,
    }
    names = exporter_names()
    group = process_group()
    if group is not None and group[0] != settings.export_rank and "prometheus" in names:
        # Only the export rank has points to serve, and the ranks of a node would all bind one port.
        names.remove("prometheus")
    return [builders[name]() for name in names]


def _otlp_exporter() -> MetricExporter:
    protocol = otlp_protocol()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        return OTLPMetricExporter()
    try:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcExporter
    except ImportError as error:
        raise ConfigurationError(f"OTLP over grpc needs the exporter package: pip install 'tolaria-otel[grpc]' "
                                 f"({error})") from error
    return GrpcExporter()


def _prometheus_reader() -> MetricReader:
    try:
        from .prometheus import ServingPrometheusReader
    except ImportError as error:
        raise ConfigurationError("OTEL_METRICS_EXPORTER=prometheus needs the exporter package: "
                                 f"pip install 'tolaria-otel[prometheus]' ({error})") from error
    raw_port = os.environ.get(ENV_PROMETHEUS_PORT, "").strip() or "9464"
    if not raw_port.isdigit() or int(raw_port) > 65535:
        raise ConfigurationError(f"{ENV_PROMETHEUS_PORT}={raw_port!r} is not valid: expected a port from 0 to 65535")
    host = os.environ.get(ENV_PROMETHEUS_HOST, "").strip() or "localhost"
    return ServingPrometheusReader(host, int(raw_port))


def _is_true(raw: str) -> bool:
    return raw.strip().lower() == "true"
