"""Mutual TLS between trainers, agents and the gateway, every part real.

A throwaway CA signs a certificate for the gateway (localhost, 127.0.0.1) and one for its clients
(tests/tls_certs.py). The core Collector `make backends` built runs collector/agent-gateway/gateway-store.yaml
unchanged on free loopback ports, with the certificate files from the environment variables the config
documents, in front of a real VictoriaMetrics:

- a trainer exports over HTTPS and over gRPC with ``OTEL_EXPORTER_OTLP_CERTIFICATE`` / ``_CLIENT_CERTIFICATE`` /
  ``_CLIENT_KEY`` (the package's provider leaves them to the exporters) and its latest top-K reaches the store;
- a client without a certificate, or with one another CA signed, is refused, over HTTP and gRPC; ``doctor``
  says the endpoint answers with the client certificate and does not without it;
- the agent (collector/agent-gateway/agent.yaml) forwards a trainer's points to the gateway over mutual TLS.
"""

from __future__ import annotations

import ssl
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2_grpc import MetricsServiceStub

from devtools.stack import COLLECTOR_DIR, Collector, VictoriaMetrics, otel_collector, victoria_metrics
from tests.test_cli import isolated_environment, main_in_process  # noqa: F401 - fixture
from tolaria_otel import SeedLayerSettings

from .pipeline_run import Run, expected_layers, export_to, run_env
from .test_collector_pipeline import in_store
from .tls_certs import Pki, make_pki

pytestmark = pytest.mark.backend

AGENT_GATEWAY = COLLECTOR_DIR / "agent-gateway"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VictoriaMetrics]:
    with victoria_metrics(tmp_path_factory.mktemp("store")) as server:
        yield server


def gateway_tls_env(pki: Pki) -> dict[str, str]:
    """What gateway-store.yaml's receivers need (documented in its comments and docs/operations.md, "TLS")."""
    return {
        "OTELCOL_TLS_CERT_FILE": str(pki.server_cert),
        "OTELCOL_TLS_KEY_FILE": str(pki.server_key),
        "OTELCOL_TLS_CLIENT_CA_FILE": str(pki.ca),
    }


@pytest.fixture(scope="module")
def gateway(pki: Pki, store: VictoriaMetrics, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Collector]:
    with otel_collector(
        tmp_path_factory.mktemp("gateway"),
        [AGENT_GATEWAY / "gateway-store.yaml"],
        name="gateway",
        env={"OTELCOL_STORE_OTLP_ENDPOINT": store.otlp_metrics_url, **gateway_tls_env(pki)},
    ) as server:
        yield server


def https(url: str) -> str:
    return url.replace("http://", "https://", 1)


def client_tls(env: pytest.MonkeyPatch, pki: Pki) -> None:
    env.setenv("OTEL_EXPORTER_OTLP_CERTIFICATE", str(pki.ca))
    env.setenv("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", str(pki.client_cert))
    env.setenv("OTEL_EXPORTER_OTLP_CLIENT_KEY", str(pki.client_key))
    # As on many images: a system-wide bundle for requests, which would override the exporter's CA file.
    env.setenv("REQUESTS_CA_BUNDLE", str(pki.stranger_cert))


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
def test_a_trainer_exports_over_mutual_tls(monkeypatch, pki, store, gateway, protocol) -> None:
    env = run_env(monkeypatch)
    instance = f"mtls-{protocol.split('/')[0]}-{uuid.uuid4().hex[:8]}"
    export_to(env, https(gateway.otlp_endpoints[protocol]), instance, protocol)
    client_tls(env, pki)
    two_epochs_reach(store, instance, top_k=2)


def two_epochs_reach(store: VictoriaMetrics, instance: str, top_k: int) -> None:
    """A trainer exporting as the environment says: each of two epochs' top-K layers reach the store."""
    run = Run(instance, settings=SeedLayerSettings(enabled=True, top_k=top_k))
    try:
        for _ in range(2):
            in_store(store, instance, expected_layers(run.epoch()))
    finally:
        run.close()


def post_empty_export(url: str, context: ssl.SSLContext) -> int:
    request = urllib.request.Request(
        f"{url}/v1/metrics", data=b"", method="POST", headers={"Content-Type": "application/x-protobuf"}
    )
    with urllib.request.urlopen(request, timeout=10, context=context) as response:
        return int(response.status)


def grpc_export(target: str, pki: Pki, client: tuple[Path, Path] | None) -> None:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.read_bytes(),
        private_key=client[1].read_bytes() if client else None,
        certificate_chain=client[0].read_bytes() if client else None,
    )
    with grpc.secure_channel(target, credentials) as channel:
        MetricsServiceStub(channel).Export(ExportMetricsServiceRequest(), timeout=10)


def test_a_client_without_a_certificate_is_refused(pki, gateway) -> None:
    url = https(gateway.otlp_endpoints["http/protobuf"])
    trusting = ssl.create_default_context(cafile=str(pki.ca))
    with_certificate = ssl.create_default_context(cafile=str(pki.ca))
    with_certificate.load_cert_chain(pki.client_cert, pki.client_key)
    stranger = ssl.create_default_context(cafile=str(pki.ca))
    stranger.load_cert_chain(pki.stranger_cert, pki.stranger_key)

    assert post_empty_export(url, with_certificate) == 200
    # The server's TLS alert says why; a connection it closed first is as much a refusal.
    for context, alert in ((trusting, "CERTIFICATE_REQUIRED"), (stranger, "UNKNOWN_CA")):
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)) as refused:
            post_empty_export(url, context)
        assert alert in str(refused.value) or isinstance(refused.value, ConnectionError), refused.value

    target = f"127.0.0.1:{gateway.grpc_port}"
    grpc_export(target, pki, (pki.client_cert, pki.client_key))  # accepted: no error
    for client in (None, (pki.stranger_cert, pki.stranger_key)):
        with pytest.raises(grpc.RpcError) as rpc_refused:
            grpc_export(target, pki, client)
        assert rpc_refused.value.code() == grpc.StatusCode.UNAVAILABLE, rpc_refused.value


def test_doctor_checks_the_endpoint_with_the_client_certificate(monkeypatch, capsys, pki, gateway) -> None:
    monkeypatch.setenv("TOLARIA_SEED_LAYER_SUMMARIES_ENABLED", "true")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", https(gateway.otlp_endpoints["http/protobuf"]))
    client_tls(monkeypatch, pki)
    code, out, err = main_in_process(["doctor", "--timeout", "5"], capsys)
    assert code == 0 and "): answers" in out, out + err
    for name in ("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", "OTEL_EXPORTER_OTLP_CLIENT_KEY"):
        line = next(line for line in out.splitlines() if line.strip().startswith(name + " "))
        assert "not used" not in line, line  # the paths are shown (a path is no secret; the files are not read out)
    assert "PRIVATE KEY" not in out + err

    monkeypatch.delenv("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE")
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_CLIENT_KEY")
    code, out, err = main_in_process(["doctor", "--timeout", "5"], capsys)
    assert code == 1 and "does not answer" in err and "certificate" in err.lower(), out + err


def test_the_agent_forwards_to_the_gateway_over_mutual_tls(monkeypatch, pki, store, gateway, tmp_path) -> None:
    """collector/agent-gateway/: the trainer -> agent (OTLP/HTTP, loopback) -> gateway (OTLP/gRPC, mutual TLS) ->
    the store."""
    agent_env = {
        "OTELCOL_GATEWAY_ENDPOINT": f"localhost:{gateway.grpc_port}",
        "OTELCOL_TLS_CA_FILE": str(pki.ca),
        "OTELCOL_TLS_CERT_FILE": str(pki.client_cert),
        "OTELCOL_TLS_KEY_FILE": str(pki.client_key),
    }
    with otel_collector(tmp_path / "agent", [AGENT_GATEWAY / "agent.yaml"], name="agent", env=agent_env) as agent:
        env = run_env(monkeypatch)
        instance = f"multi-node-{uuid.uuid4().hex[:8]}"
        export_to(env, agent.otlp_endpoints["http/protobuf"], instance)
        two_epochs_reach(store, instance, top_k=3)


# ------------------------------------------------------------------ the variables as each exporter reads them
def test_client_certificate_rules(pki: Pki) -> None:
    from tolaria_otel.config.otel_env import ConfigurationError, otlp_client_certificate

    pair = {
        "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE": str(pki.client_cert),
        "OTEL_EXPORTER_OTLP_CLIENT_KEY": str(pki.client_key),
    }
    ca = {"OTEL_EXPORTER_OTLP_CERTIFICATE": str(pki.ca)}
    expected = (str(pki.client_cert), str(pki.client_key))
    assert otlp_client_certificate(pair, "http/protobuf") == expected
    assert otlp_client_certificate({**pair, **ca}, "grpc") == expected
    assert otlp_client_certificate({}, "grpc") is None
    refused = {
        # The gRPC exporter loads a client certificate only with a CA file, and never mixes the two sets.
        "grpc without a CA": ({**pair}, "grpc", r"^OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE is not used: over grpc"),
        "grpc, general pair under a metrics CA": (
            {**pair, "OTEL_EXPORTER_OTLP_METRICS_CERTIFICATE": str(pki.ca)},
            "grpc",
            r"^OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE is not used: .*METRICS_CLIENT_CERTIFICATE",
        ),
        "a key alone": (
            {"OTEL_EXPORTER_OTLP_CLIENT_KEY": str(pki.client_key)},
            "http/protobuf",
            r"^OTEL_EXPORTER_OTLP_CLIENT_KEY is set but neither .* is set",
        ),
        "a missing file": (
            {**pair, "OTEL_EXPORTER_OTLP_METRICS_CLIENT_KEY": "/no/such/key.pem"},
            "http/protobuf",
            r"^OTEL_EXPORTER_OTLP_METRICS_CLIENT_KEY='/no/such/key.pem' is not valid: not a readable",
        ),
    }
    for env, protocol, message in refused.values():  # the keys name the cases for the reader
        with pytest.raises(ConfigurationError, match=message):
            otlp_client_certificate(env, protocol)
