"""Pull mode: a Prometheus reader that serves ``/metrics`` with exactly the latest snapshot.

Two things differ from the upstream ``PrometheusMetricReader`` and its auto-configured server:

- Each reader serves its own registry on its own server, stopped on shutdown, so that several
  providers in one process (tests, notebooks, two trainers) neither leak ports nor mix series.
- A scrape shows the snapshot of the latest collection only. Upstream queues the result of every
  collection (each ``force_flush()``, which the demo and ``close()`` call at every epoch end) until
  the next scrape and merges the queue into it: one scrape after four flushed epochs would show the
  stages and layers of all four beside each other, with every family repeated.
"""

from __future__ import annotations

import dataclasses
import inspect
import threading
from collections.abc import Iterable
from typing import Any

from opentelemetry.exporter.prometheus import PrometheusMetricReader, _CustomCollector
from opentelemetry.sdk.metrics.export import Metric, MetricsData
from prometheus_client import REGISTRY, CollectorRegistry, start_http_server
from prometheus_client.core import Metric as PrometheusFamily

#: Whether the exporter's reader takes a registry (0.63b0 on); an older one registers in prometheus_client's global one.
_READER_TAKES_REGISTRY = "registry" in inspect.signature(PrometheusMetricReader.__init__).parameters


class ServingPrometheusReader(PrometheusMetricReader):
    """``PrometheusMetricReader`` plus its HTTP server, owned by the reader's lifetime.

    Port 0 picks a free one: see ``port`` and ``url``. Raises ``OSError`` (or ``ValueError`` for a
    host name that cannot be encoded) when the server cannot listen on ``host:port``.
    """

    def __init__(self, host: str, port: int) -> None:
        registry = CollectorRegistry()
        if _READER_TAKES_REGISTRY:
            super().__init__(registry=registry)
            registry.unregister(self._collector)
        else:
            super().__init__()
            REGISTRY.unregister(self._collector)
        self._own_registry = registry
        self._collector = _LatestSnapshotCollector()
        registry.register(self._collector)
        self._collector._callback = self.collect  # type: ignore[assignment]  # as upstream does, once registered
        self._server, self._thread = start_http_server(port=port, addr=host, registry=registry)
        self.host = host
        self.port: int = self._server.server_port
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{self.port}/metrics"

    def _receive_metrics(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any) -> None:
        if metrics_data is not None:
            metrics_data = _without_repeated_units(metrics_data)
        super()._receive_metrics(metrics_data, timeout_millis, **kwargs)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self._server.shutdown()
        self._server.server_close()
        if _READER_TAKES_REGISTRY:
            super().shutdown(timeout_millis, **kwargs)
        else:  # the older reader's shutdown would unregister its collector from the global registry
            self._own_registry.unregister(self._collector)


class _LatestSnapshotCollector(_CustomCollector):
    """Upstream's collector, holding one snapshot instead of a queue of them.

    The lock spans a whole scrape (the scrape's own collection, then the translation), so that a
    ``force_flush()`` on the training thread cannot slip a second snapshot in between. Reentrant:
    the scrape's collection reaches ``add_metrics_data`` on the same thread.
    """

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.RLock()

    def add_metrics_data(self, metrics_data: MetricsData) -> None:
        with self._lock:
            self._metrics_datas.clear()
            self._metrics_datas.append(metrics_data)

    def collect(self) -> Iterable[PrometheusFamily]:
        with self._lock:
            return list(super().collect())


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
            dataclasses.replace(
                rm,
                scope_metrics=[
                    dataclasses.replace(sm, metrics=[fix(m) for m in sm.metrics]) for sm in rm.scope_metrics
                ],
            )
            for rm in metrics_data.resource_metrics
        ],
    )
