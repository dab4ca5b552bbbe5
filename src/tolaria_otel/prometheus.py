"""Pull mode: a Prometheus reader that serves ``/metrics`` and stops serving on shutdown."""

from __future__ import annotations

from typing import Any

from opentelemetry.exporter.prometheus import PrometheusMetricReader
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

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self._server.shutdown()
        self._server.server_close()
        super().shutdown(timeout_millis, **kwargs)
