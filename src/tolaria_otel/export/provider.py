"""A ``MeterProvider`` built from the standard ``OTEL_*`` variables, with the package's views.

This module chooses which exporters to build, as ``opentelemetry-instrument`` would, once
:func:`tolaria_otel.otel_env.environment_problems` has checked every value the chosen exporters will read
(the variables, their defaults and their checks are :mod:`tolaria_otel.otel_env`'s), and builds the readers:
OTLP over HTTP (on a ``requests`` session that keeps the CA file the user named) or gRPC, console, and
pull mode's serving Prometheus reader.
"""

from __future__ import annotations

import errno
import sys
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import SERVICE_NAME, Resource

from ..config.environment import Environ, echoed
from ..config.otel_env import (
    DEFAULT_SERVICE_NAME,
    ENV_EXPORTER,
    ENV_PROMETHEUS_HOST,
    ENV_PROMETHEUS_PORT,
    ConfigurationError,
    environment_problems,
    exporter_names,
    otlp_protocol,
    prometheus_address,
    sdk_disabled,
)
from ..config.redaction import install_log_redaction
from ..config.settings import SeedLayerSettings
from .instruments import seed_layer_views
from .resource import distributed_resource, process_group

if TYPE_CHECKING:
    import requests

#: ConfigurationError is defined in otel_env, beside the checks that raise it, and is still importable from here.
__all__ = ["ConfigurationError", "configure_meter_provider", "metrics_urls", "prometheus_reader"]

#: The readers :func:`configure_meter_provider` gave each provider it made: the SDK has no public
#: accessor for a provider's readers (only a private attribute), so the package keeps its own list,
#: released with the provider.
_readers_made: weakref.WeakKeyDictionary[MeterProvider, list[MetricReader]] = weakref.WeakKeyDictionary()


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
    size (:func:`tolaria_otel.export.resource.distributed_resource`): build the provider after
    ``init_process_group``. Raises :class:`ConfigurationError` for the first problem
    :func:`environment_problems` finds.
    """
    _check_arguments(settings, resource, readers)
    settings = SeedLayerSettings.from_env() if settings is None else settings
    views = seed_layer_views(settings)
    problems = environment_problems()
    if problems:
        raise problems[0]
    if sdk_disabled():
        return MeterProvider(views=views)  # the SDK hands out no-op meters
    install_log_redaction()  # before any exporter reads (and may log) the variables
    if resource is None:
        resource = Resource.create()
        if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
            resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
        resource = resource.merge(distributed_resource())  # rank and world size under torch.distributed
    all_readers = [*_readers_from_env(settings), *readers]
    provider = MeterProvider(metric_readers=all_readers, resource=resource, views=views)
    _readers_made[provider] = all_readers
    return provider


def metrics_urls(provider: MeterProvider) -> list[str]:
    """The ``/metrics`` URL of each pull-mode reader of ``provider`` (none in push mode), for a provider
    :func:`configure_meter_provider` made (any other has none here).

    Without the optional Prometheus exporter installed there is no pull-mode reader, and this imports nothing.
    """
    pull_mode = sys.modules.get(f"{__package__}.prometheus_reader")  # loaded by any pull-mode reader ever made
    if pull_mode is None:
        return []
    return [
        reader.url
        for reader in _readers_made.get(provider, ())
        if isinstance(reader, pull_mode.ServingPrometheusReader)
    ]


def prometheus_reader(environ: Environ | None = None) -> MetricReader:
    """A serving pull-mode reader at :func:`prometheus_address`; the caller shuts it down."""
    host, port = prometheus_address(environ)
    try:
        from .prometheus_reader import ServingPrometheusReader
    except ImportError as error:
        raise ConfigurationError(
            f"{ENV_EXPORTER}=prometheus needs the exporter package: pip install 'tolaria-otel[prometheus]' ({error})"
        ) from error
    try:
        return ServingPrometheusReader(host, port)
    except OSError as error:
        if error.errno in (errno.EADDRINUSE, errno.EACCES):
            why = (
                "in use (another trainer or program listens there)"
                if error.errno == errno.EADDRINUSE
                else "not allowed for this user (ports below 1024 need privileges)"
            )
            raise ConfigurationError(
                f"{ENV_PROMETHEUS_PORT}={port} is not usable: port {port} on {echoed(host)} is {why}; give each "
                "trainer its own port, or 0 for a free one"
            ) from None
        reason = error.strerror or str(error)
        raise ConfigurationError(
            f"{ENV_PROMETHEUS_HOST}={echoed(host)} is not usable: {reason}; expected a name or "
            "address of this machine, e.g. localhost, 127.0.0.1 or 0.0.0.0"
        ) from None
    except ValueError:  # a host name that IDNA cannot encode
        raise ConfigurationError(
            f"{ENV_PROMETHEUS_HOST}={echoed(host)} is not valid: expected a name or address of "
            "this machine, e.g. localhost, 127.0.0.1 or 0.0.0.0"
        ) from None


def _check_arguments(settings: object, resource: object, readers: object) -> None:
    if settings is not None and not isinstance(settings, SeedLayerSettings):
        raise TypeError(
            f"settings is {type(settings).__name__}: expected a tolaria_otel.SeedLayerSettings, or None "
            "to read the TOLARIA_* variables"
        )
    if resource is not None and not isinstance(resource, Resource):
        raise TypeError(
            f"resource is {type(resource).__name__}: expected an opentelemetry.sdk.resources.Resource, "
            "or None for the SDK's own"
        )
    if isinstance(readers, (str, bytes)) or not isinstance(readers, Sequence):
        raise TypeError(
            f"readers is {type(readers).__name__}: expected a sequence of opentelemetry.sdk.metrics.export.MetricReader"
        )
    for reader in readers:
        if not isinstance(reader, MetricReader):
            raise TypeError(
                f"readers holds a {type(reader).__name__}: expected only "
                "opentelemetry.sdk.metrics.export.MetricReader instances"
            )


def _readers_from_env(settings: SeedLayerSettings) -> list[MetricReader]:
    builders: dict[str, Callable[[], MetricReader]] = {
        "otlp": lambda: PeriodicExportingMetricReader(_otlp_exporter()),
        "console": lambda: PeriodicExportingMetricReader(ConsoleMetricExporter()),
        "prometheus": prometheus_reader,
    }
    names = exporter_names()
    group = process_group()
    if group is not None and group[0] != settings.export_rank and "prometheus" in names:
        # Only the export rank has points to serve, and the ranks of a node would all bind one port.
        names.remove("prometheus")
    return [builders[name]() for name in names]


def _otlp_exporter() -> MetricExporter:
    if otlp_protocol() == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        return OTLPMetricExporter(session=_session_keeping_its_ca())
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcExporter

    return GrpcExporter()


def _session_keeping_its_ca() -> requests.Session:
    """A ``requests`` session on which ``OTEL_EXPORTER_OTLP_[METRICS_]CERTIFICATE`` holds.

    The HTTP exporter puts the CA file on its session (``session.verify``), but ``requests`` lets a
    ``REQUESTS_CA_BUNDLE`` or ``CURL_CA_BUNDLE`` in the environment (set system-wide on many distributions
    and images) override a session's ``verify`` at every request, so the CA the user named would be
    ignored and every export fail certificate verification. Proxies and the rest of the environment
    still apply.
    """
    import requests

    class Session(requests.Session):
        def merge_environment_settings(self, url, proxies, stream, verify, cert):  # type: ignore[no-untyped-def]
            settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
            if isinstance(self.verify, str) and verify is None:  # the exporter's CA file, not a per-request choice
                settings["verify"] = self.verify
            return settings

    return Session()
