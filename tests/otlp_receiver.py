"""Minimal OTLP metrics receivers on a local socket, one per transport, keeping what they decode.

They stand in for the OpenTelemetry Collector's OTLP receiver, which cannot be installed here: the
exporter under test is the real SDK exporter, talking HTTP or gRPC over a real socket.
"""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc

from devtools.stack import QuietHandler, http_server


class Received:
    """Decoded export requests, in arrival order, with a way to wait for the next one."""

    def __init__(self) -> None:
        self.requests: list[metrics_service_pb2.ExportMetricsServiceRequest] = []
        self._condition = threading.Condition()

    def add(self, request: metrics_service_pb2.ExportMetricsServiceRequest) -> None:
        with self._condition:
            self.requests.append(request)
            self._condition.notify_all()

    def wait_for(self, count: int, timeout: float = 10.0) -> list[metrics_service_pb2.ExportMetricsServiceRequest]:
        deadline = time.monotonic() + timeout
        with self._condition:
            while len(self.requests) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"received {len(self.requests)} OTLP requests, expected {count}")
                self._condition.wait(left)
            return list(self.requests)


def gauge_points(request: metrics_service_pb2.ExportMetricsServiceRequest) -> dict[str, list[tuple[dict, float, str]]]:
    """metric name -> [(attributes, value, unit)] for every gauge in one request."""
    out: dict[str, list[tuple[dict, float, str]]] = {}
    for resource_metrics in request.resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                for point in metric.gauge.data_points:
                    attributes = {kv.key: kv.value.string_value for kv in point.attributes}
                    value = point.as_double if point.HasField("as_double") else float(point.as_int)
                    out.setdefault(metric.name, []).append((attributes, value, metric.unit))
    return out


@contextmanager
def http_receiver() -> Iterator[tuple[str, Received]]:
    """Yields (metrics endpoint URL, received) for OTLP/HTTP protobuf."""
    received = Received()

    class Handler(QuietHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            received.add(metrics_service_pb2.ExportMetricsServiceRequest.FromString(body))
            reply = metrics_service_pb2.ExportMetricsServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

    with http_server(Handler) as url:
        yield f"{url}/v1/metrics", received


@contextmanager
def grpc_receiver() -> Iterator[tuple[str, Received]]:
    """Yields (endpoint, received) for OTLP/gRPC."""
    received = Received()

    class Service(metrics_service_pb2_grpc.MetricsServiceServicer):
        def Export(self, request, context):
            received.add(request)
            return metrics_service_pb2.ExportMetricsServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Service(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"http://127.0.0.1:{port}", received
    finally:
        server.stop(grace=None).wait(5)
