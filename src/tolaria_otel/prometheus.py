"""Pull mode: a Prometheus reader that serves ``/metrics`` and stops serving on shutdown."""

from __future__ import annotations

import dataclasses
from typing import Any

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics.export import Metric, MetricsData
from prometheus_client import start_http_server


class ServingPrometheusReader(PrometheusMetricReader):
    """``PrometheusMetricReader`` plus its HTTP server, owned by the reader's lifetime.

    The upstream auto-configured reader starts a server it never stops; a trainer that builds
    several providers (tests, notebooks) would leak ports. Port 0 picks a free one: see ``port``.
    """

    def __init__(self, host: str, port: int) -> None:
        super().__init__()
        self._server, self._thread = start_http_server(port=port, addr=host)
        self.host = host
        self.port: int = self._server.server_port

    def _receive_metrics(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any) -> None:
        if metrics_data is not None:
            metrics_data = _without_repeated_units(metrics_data)
        super()._receive_metrics(metrics_data, timeout_millis, **kwargs)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self._server.shutdown()
        self._server.server_close()
        super().shutdown(timeout_millis, **kwargs)


def _without_repeated_units(metrics_data: MetricsData) -> MetricsData:
    """Drop the unit of a metric whose name already has it as a token.

    The Collector's Prometheus exporter and VictoriaMetrics add a unit suffix only when the unit is
    not already a token of the name, so ``tolaria.grad_agg.seed.layer_norm`` (unit ``grad``) becomes
    ``tolaria_grad_agg_seed_layer_norm``. The Python exporter always appends it
    (``..._layer_norm_grad``); without this, pull mode and push mode would name the series apart.
    """

    def fix(metric: Metric) -> Metric:
        tokens = metric.name.replace(".", "_").split("_")
        return dataclasses.replace(metric, unit="") if metric.unit and metric.unit in tokens else metric

    return dataclasses.replace(
        metrics_data,
        resource_metrics=[
            dataclasses.replace(rm, scope_metrics=[
                dataclasses.replace(sm, metrics=[fix(m) for m in sm.metrics]) for sm in rm.scope_metrics
            ])
            for rm in metrics_data.resource_metrics
        ],
    )
