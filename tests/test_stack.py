"""The local backend stack (devtools/stack.py) against the real binaries.

Nothing here is skipped: without the binaries every test fails with
"run `make backends`", because a silently skipped backend test proves nothing.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, MetricExportResult
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from devtools.stack import (
    REPO_ROOT,
    Prometheus,
    VictoriaMetrics,
    backend_binaries,
    free_port,
    prometheus,
    victoria_metrics,
    wait_until,
)

pytestmark = pytest.mark.backend

RESOURCE = Resource.create({"service.name": "tolaria-test", "service.instance.id": "run-1"})


@pytest.fixture
def vm(tmp_path: Path) -> Iterator[VictoriaMetrics]:
    with victoria_metrics(tmp_path / "vm") as server:
        yield server


def export_gauge(
    vm: VictoriaMetrics,
    name: str,
    value: float,
    attributes: dict[str, str] | None = None,
    unit: str = "grad",
    compression: Compression = Compression.NoCompression,
) -> None:
    """One OTLP/HTTP protobuf export of one gauge point, exactly as the SDK sends it."""
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], resource=RESOURCE)
    provider.get_meter("tolaria.test").create_gauge(name, unit=unit).set(value, attributes)
    data = reader.get_metrics_data()
    assert data is not None
    exporter = OTLPMetricExporter(endpoint=vm.otlp_metrics_url, compression=compression, timeout=10)
    try:
        assert exporter.export(data) is MetricExportResult.SUCCESS
    finally:
        exporter.shutdown()
        provider.shutdown()


def query_one(vm: VictoriaMetrics, promql: str) -> dict[str, Any]:
    """Poll until the query has exactly one series (ingestion is asynchronous)."""
    result = wait_until(lambda: vm.query(promql), timeout=15, message=f"no result for {promql}")
    assert len(result) == 1, result
    return result[0]


def test_binaries_run() -> None:
    binaries = backend_binaries()
    for binary in (binaries.prometheus, binaries.promtool):
        assert "version 2." in subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout
    # The Debian build prints an empty -version; -help proves the binary runs here (its text, not its exit status,
    # which Go's flag package leaves to the build).
    help_run = subprocess.run(
        [binaries.victoria_metrics, "-help"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False
    )
    help_text = help_run.stdout.decode()
    assert "-opentelemetry.usePrometheusNaming" in help_text


def test_vm_ingests_otlp_gauge_under_prometheus_name(vm: VictoriaMetrics) -> None:
    export_gauge(vm, "tolaria.test.value", 42.5)
    # usePrometheusNaming: dots -> "_", and the unit is appended as a suffix.
    sample = query_one(vm, "tolaria_test_value_grad")
    assert sample["value"][1] == "42.5"
    assert sample["metric"]["service_name"] == "tolaria-test"


def test_vm_labels_of_seed_layer_gauge(vm: VictoriaMetrics) -> None:
    export_gauge(vm, "tolaria.grad_agg.seed.layer_norm", 0.25, {"seed_id": "s7", "stage": "blending", "layer": "2"})
    # No "_grad" suffix here: the name already has a "grad" word, so the unit is
    # not appended again. Resource attributes become plain labels; VM 1.112 does
    # NOT derive job/instance from service.name/service.instance.id.
    assert vm.series('{__name__=~"tolaria_grad_agg_seed_layer_norm.*"}') == [
        {
            "__name__": "tolaria_grad_agg_seed_layer_norm",
            "seed_id": "s7",
            "stage": "blending",
            "layer": "2",
            "service_name": "tolaria-test",
            "service_instance_id": "run-1",
            "telemetry_sdk_language": "python",
            "telemetry_sdk_name": "opentelemetry",
            "telemetry_sdk_version": RESOURCE.attributes["telemetry.sdk.version"],
        }
    ]
    assert query_one(vm, 'tolaria_grad_agg_seed_layer_norm{seed_id="s7"}')["value"][1] == "0.25"


def test_vm_accepts_gzip_otlp(vm: VictoriaMetrics) -> None:
    export_gauge(vm, "tolaria.test.gzipped", 3.0, compression=Compression.Gzip)
    assert query_one(vm, "tolaria_test_gzipped_grad")["value"][1] == "3"


def test_vm_stop_start_same_port_keeps_data(vm: VictoriaMetrics) -> None:
    url = vm.url
    export_gauge(vm, "tolaria.test.before", 1.0)
    query_one(vm, "tolaria_test_before_grad")

    vm.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(vm.url + "/health", timeout=2)
    vm.start()

    assert vm.url == url
    assert query_one(vm, "tolaria_test_before_grad")["value"][1] == "1"  # graceful stop persisted it
    export_gauge(vm, "tolaria.test.after", 2.0)
    assert query_one(vm, "tolaria_test_after_grad")["value"][1] == "2"


def test_vm_comes_back_after_crash(vm: VictoriaMetrics) -> None:
    vm.kill()  # SIGKILL: what a fault-injection test does mid-run
    assert not vm.running
    vm.start()
    export_gauge(vm, "tolaria.test.after_crash", 5.0)
    assert query_one(vm, "tolaria_test_after_crash_grad")["value"][1] == "5"


def test_prometheus_scrapes_target_and_fires_rule(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    Gauge("tolaria_probe_value", "probe", registry=registry).set(7)
    target_port = free_port()
    server, thread = start_http_server(target_port, addr="127.0.0.1", registry=registry)
    config = f"""
global:
  scrape_interval: 500ms
  evaluation_interval: 500ms
scrape_configs:
  - job_name: probe
    static_configs: [{{targets: ['127.0.0.1:{target_port}']}}]
"""
    rules = """
groups:
  - name: probe
    rules:
      - alert: ProbeHigh
        expr: tolaria_probe_value > 5
"""
    try:
        with prometheus(config, tmp_path / "prom", rule_files=[rules]) as prom:
            prom.wait_for(lambda: [t for t in prom.targets() if t["health"] == "up"], message="target not up")
            sample = prom.wait_for(lambda: prom.query("tolaria_probe_value"), message="not scraped")
            assert sample[0]["value"][1] == "7"
            assert sample[0]["metric"]["job"] == "probe"
            firing = prom.wait_for(
                lambda: [a for a in prom.alerts() if a["state"] == "firing"], message="alert not firing"
            )
            assert firing[0]["labels"]["alertname"] == "ProbeHigh"

            url = prom.url
            prom.restart()
            assert prom.url == url
            assert prom.query("tolaria_probe_value")[0]["value"][1] == "7"  # TSDB survived (WAL)
    finally:
        server.shutdown()
        thread.join()


def test_startup_error_shows_log_tail(tmp_path: Path) -> None:
    with (
        pytest.raises(RuntimeError, match=r"prometheus failed to start(.|\n)*not_a_field"),
        prometheus("not_a_field: 1\n", tmp_path / "prom"),
    ):
        pass


def test_wait_until_times_out_with_message() -> None:
    with pytest.raises(TimeoutError, match="never true"):
        wait_until(lambda: False, timeout=0.2, message="never true")
    assert wait_until(lambda: 3, timeout=0.2) == 3


def test_make_stack_runs_the_whole_chain_and_the_demo_exports_through_what_it_prints(tmp_path: Path) -> None:
    """`make stack` (python -m devtools.stack): Collector -> VictoriaMetrics -> Prometheus with the rules; the
    printed OTEL_EXPORTER_OTLP_ENDPOINT, given to `tolaria-otel demo --otlp-endpoint`, reaches the rules."""
    output = tmp_path / "stack.out"
    with output.open("w") as out:
        stack = subprocess.Popen(
            [sys.executable, "-m", "devtools.stack", "--interval", "1s", "--data-dir", str(tmp_path / "data")],
            cwd=REPO_ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    try:
        printed = wait_until(
            lambda: "Ctrl-C to stop." in output.read_text() and output.read_text(),
            timeout=60,
            message="the stack did not come up",
        )
        assert isinstance(printed, str)  # the log's text, once it says the stack is up
        endpoint = re.search(r"^  export OTEL_EXPORTER_OTLP_ENDPOINT=(http://127\.0\.0\.1:\d+)$", printed, re.M)
        prometheus_url = re.search(r"^Prometheus: +(http://127\.0\.0\.1:\d+)", printed, re.M)
        assert endpoint and prometheus_url, printed
        assert re.search(r"^OpenTelemetry Collector: OTLP/HTTP http://\S+, OTLP/gRPC http://\S+", printed, re.M)
        assert re.search(r"^VictoriaMetrics: +http://127\.0\.0\.1:\d+", printed, re.M)

        summaries = tmp_path / "demo.jsonl"
        demo = subprocess.run(
            [
                str(Path(sys.executable).with_name("tolaria-otel")),
                "demo",
                "--otlp-endpoint",
                endpoint.group(1),
                "--epochs",
                "2",
                "--quiet",
                "--output",
                str(summaries),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert demo.returncode == 0, demo.stdout + demo.stderr
        last = json.loads(summaries.read_text().splitlines()[-1])
        expected = {
            (seed["seed_id"], seed["stage"], layer["layer"]): layer["value"]
            for seed in last["seeds"]
            for layer in seed["top_layers"]
            if layer["value"] is not None
        }
        assert expected

        prom = Prometheus(backend_binaries().prometheus, tmp_path, tmp_path / "unused.yml")
        prom.url = prometheus_url.group(1)  # the stack's own Prometheus, only queried here

        def current() -> dict[tuple[str, str, str], float]:
            return {
                (r["metric"]["seed_id"], r["metric"]["stage"], r["metric"]["layer"]): float(r["value"][1])
                for r in prom.query("tolaria:seed_layer_norm:current")
            }

        prom.wait_for(
            lambda: current().keys() == expected.keys(),
            timeout=60,
            message="the demo's last top-K is not Prometheus' current top-K",
        )
        assert current() == pytest.approx(expected, rel=1e-9)
    finally:
        stack.send_signal(signal.SIGTERM)
        stack.wait(30)
    assert stack.returncode == 0
    assert output.read_text().rstrip().endswith("stopped.")
