"""The pipeline the README describes, every part real: a training run exports OTLP (HTTP and gRPC) to the
OpenTelemetry Collector (built by `make backends`, running collector/otel-collector-store.yaml: otlp receiver,
memory_limiter, batch, otlphttp exporter), which writes into VictoriaMetrics; Nissa's Prometheus federates it
(collector/prometheus-store.yml) and evaluates collector/rules.

- the documented current-top-K query answers exactly the latest epoch's top-K, in the store and in Prometheus
  (the recording rule), across a top-K change and a stage change, over both protocols;
- the alerts fire on a run with a NaN layer and an exploding layer, and stay quiet for a healthy run beside it;
- the agent/gateway pair of collector/agent-gateway/ (mutual TLS between them) runs as two real Collectors in
  tests/test_tls.py.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from devtools.stack import (
    Collector,
    Prometheus,
    VictoriaMetrics,
    otel_collector,
    prometheus,
    store_prometheus_config,
    victoria_metrics,
    wait_until,
)

from .pipeline_run import Run, as_layers, current_top_k, expected_layers, export_to, run_env

pytestmark = pytest.mark.backend

PROTOCOLS = ("http/protobuf", "grpc")
#: Generous bounds for a loaded 2-core machine; the pipeline normally takes a fraction of them (the delays
#: are documented in docs/operations.md, "The current top-K, and its delay").
STORE_TIMEOUT_S = 15.0
PROMETHEUS_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VictoriaMetrics]:
    with victoria_metrics(tmp_path_factory.mktemp("store")) as server:
        yield server


@pytest.fixture(scope="module")
def collector(store: VictoriaMetrics, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Collector]:
    with otel_collector(
        tmp_path_factory.mktemp("otelcol"), env={"OTELCOL_STORE_OTLP_ENDPOINT": store.otlp_metrics_url}
    ) as server:
        yield server


@pytest.fixture(scope="module")
def nissa(store: VictoriaMetrics, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    with prometheus(store_prometheus_config(store.url, interval="1s"), tmp_path_factory.mktemp("prom")) as server:
        yield server


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    return run_env(monkeypatch)


def in_store(store: VictoriaMetrics, instance: str, expected: dict) -> None:
    selector = f'{{service_instance_id="{instance}"}}'
    wait_until(
        lambda: as_layers(store.query(current_top_k(selector))) == pytest.approx(expected, rel=1e-12),
        timeout=STORE_TIMEOUT_S,
        message=f"{instance}: latest top-K not in the store",
    )


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_current_top_k_through_the_collector_into_prometheus(env, store, collector, nissa, protocol):
    instance = f"{protocol.split('/')[0]}-{uuid.uuid4().hex[:8]}"
    export_to(env, collector.otlp_endpoints[protocol], instance, protocol)
    run = Run(instance)
    try:
        for epoch, boosted in enumerate(("net.0", "net.4")):  # seed-0's top layer changes at epoch 1
            run.tamper.scale = {"boost": (run.layer(0, boosted), 100.0)}
            if epoch == 1:
                run.kasmina.stages["seed-1"] = "BLENDING"
            summary = run.epoch()
            assert summary.seeds["seed-0"].top_layers[0][0] == boosted
            expected = expected_layers(summary)
            in_store(store, instance, expected)

            # Prometheus: federated from the store, the recording rule over the points' own timestamps; job and
            # instance from the trainer's service.name and service.instance.id, as the contrib path gives them.
            def recorded(expected: dict = expected) -> list[dict] | None:
                result = nissa.query(f'tolaria:seed_layer_norm:current{{instance="{instance}"}}')
                return result if as_layers(result) == pytest.approx(expected, rel=1e-12) else None

            result = nissa.wait_for(
                recorded,
                timeout=PROMETHEUS_TIMEOUT_S,
                message=f"epoch {epoch}: Prometheus' current top-K is not the epoch's",
            )
            for item in result:
                assert item["metric"]["job"] == "tolaria-pipeline-test"
                assert item["metric"]["service_instance_id"] == instance
        # The layer that left seed-0's top-K is still stored (the reason the current-top-K query exists).
        plain = as_layers(nissa.query(f'tolaria_grad_agg_seed_layer_norm{{instance="{instance}", seed_id="seed-0"}}'))
        assert ("seed-0", "TRAINING", "net.0") in plain
        assert ("seed-0", "TRAINING", "net.0") not in expected
    finally:
        run.close()


def test_alerts_fire_through_the_collector_and_a_healthy_run_stays_quiet(env, store, collector, nissa):
    runs = {}
    for name in ("healthy", "faulty"):
        instance = f"{name}-{uuid.uuid4().hex[:8]}"
        export_to(env, collector.otlp_endpoints["http/protobuf"], instance)
        runs[name] = Run(instance)
    faulty, healthy = runs["faulty"], runs["healthy"]
    faulty.tamper.nan = [faulty.layer(1, "net.0")]  # seed-1's first layer turns NaN
    faulty.tamper.scale = {"explode": (faulty.layer(2, "net.4"), 1e6)}  # seed-2's last layer above 1000
    try:
        for _ in range(2):
            for run in runs.values():
                run.epoch()
        assert list(faulty.summaries[-1].seeds["seed-1"].nonfinite_layers) == ["net.0"]

        # The store is shared by the module's tests: an earlier test's run (a layer boosted 100x) may have an
        # alert of its own, so only this test's runs are looked at.
        ours = {run.instance for run in runs.values()}

        def alerts() -> list[dict]:
            return [a for a in nissa.alerts() if a["labels"].get("instance") in ours]

        def firing() -> set[tuple[str, str, str]]:
            return {
                (a["labels"]["alertname"], a["labels"]["instance"], a["labels"]["layer"])
                for a in alerts()
                if a["state"] == "firing"
            }

        nissa.wait_for(firing, timeout=PROMETHEUS_TIMEOUT_S, message="TolariaSeedLayerNonFinite not firing")
        assert firing() == {("TolariaSeedLayerNonFinite", faulty.instance, "net.0")}
        exploding = nissa.wait_for(
            lambda: [a for a in alerts() if a["labels"]["alertname"] == "TolariaSeedLayerGradientExploding"],
            timeout=PROMETHEUS_TIMEOUT_S,
            message="TolariaSeedLayerGradientExploding not pending",
        )
        assert {
            (a["labels"]["instance"], a["labels"]["seed_id"], a["labels"]["layer"], a["state"]) for a in exploding
        } == {(faulty.instance, "seed-2", "net.4", "pending")}  # for: 5m
        # The healthy run: no alert at all once its epochs are in (TelemetryAbsent may be pending for a moment
        # while only its info gauge has arrived, by design).
        nissa.wait_for(
            lambda: not [a for a in alerts() if a["labels"]["instance"] == healthy.instance],
            timeout=PROMETHEUS_TIMEOUT_S,
            message="an alert on the healthy run",
        )
    finally:
        for run in runs.values():
            run.close()
