"""The telemetry pipeline end to end, against real servers (issue 3).

- OTLP/HTTP from a training run into a real VictoriaMetrics: exactly the latest top-K, labels and values
  of the in-process ``EpochSummary``;
- pull mode (``OTEL_METRICS_EXPORTER=prometheus``) scraped by a real Prometheus running
  ``collector/prometheus.yml`` with the real rules: same series and values; a run with a NaN seed and an
  exploding layer fires the alerts (live, and through ``promtool`` on the series Prometheus recorded), a
  healthy run fires none;
- the documented current-top-K query (docs/operations.md) follows a top-K change within a bounded delay;
- faults: backend down at start, killed mid-run, back on the same port.

Here OTLP goes straight to VictoriaMetrics' OTLP receiver; the same through the real Collector, and its
faults, are in tests/test_collector_pipeline.py and tests/test_collector_faults.py.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from devtools.stack import (
    REPO_ROOT,
    VictoriaMetrics,
    backend_binaries,
    free_port,
    prometheus,
    victoria_metrics,
    wait_until,
)
from tolaria_otel import SeedLayerSettings

from .pipeline_run import EXPORT_INTERVAL_MS, Run, as_layers, current_top_k, expected_layers, run_env

pytestmark = pytest.mark.backend

PROMETHEUS_CONFIG = REPO_ROOT / "collector" / "prometheus.yml"
RULES_DIR = REPO_ROOT / "collector" / "rules"
#: Bound on the delay from end_epoch() to the current-top-K query returning the new layers, push to
#: VictoriaMetrics: one export interval plus VictoriaMetrics' ingestion (flushed by the query helper) plus
#: a margin for a loaded 2-core CI machine.
TOP_K_DELAY_BOUND_S = EXPORT_INTERVAL_MS / 1000 + 3.0
PUSH_RESOURCE_LABELS = {
    "service_name",
    "service_instance_id",
    "telemetry_sdk_language",
    "telemetry_sdk_name",
    "telemetry_sdk_version",
}


@pytest.fixture
def otel_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """The variables every pipeline run shares, with an OTLP timeout of 1 s (docs/operations.md, "Collector down")."""
    run_env(monkeypatch)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")  # seconds, in the Python SDK
    return monkeypatch


def push_to(monkeypatch: pytest.MonkeyPatch, vm: VictoriaMetrics, instance: str) -> None:
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "http/protobuf")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", vm.otlp_metrics_url)
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", f"service.instance.id={instance}")


@pytest.fixture(scope="module")
def vm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VictoriaMetrics]:
    with victoria_metrics(tmp_path_factory.mktemp("vm")) as server:
        yield server


# ----------------------------------------------------------------------------------------- 1. OTLP into a store
def test_otlp_into_victoriametrics_equals_epoch_summary(otel_env, vm):
    instance = f"push-{uuid.uuid4().hex[:8]}"
    push_to(otel_env, vm, instance)
    run = Run(instance)
    selector = f'{{service_instance_id="{instance}"}}'

    def lifecycle(epoch: int) -> None:
        if epoch == 1:
            run.kasmina.stages["seed-1"] = "BLENDING"
        if epoch == 2:
            run.kasmina.remove("seed-2")

    try:
        for _ in range(3):
            summary = run.epoch(before=lifecycle)
            assert run.provider.force_flush(10_000)
            expected = expected_layers(summary)

            def exported(expected: dict = expected) -> dict | None:
                got = as_layers(vm.query(current_top_k(selector)))
                return got if got.keys() == expected.keys() else None

            got = wait_until(exported, timeout=10, message=f"epoch {summary.epoch} not in VictoriaMetrics")
            assert got == pytest.approx(expected, rel=1e-12)
            for seed_id, seed in summary.seeds.items():  # exactly top_k series per seed
                assert len([key for key in got if key[0] == seed_id]) == min(2, seed.layer_count)
            seed_norms = {
                r["metric"]["seed_id"]: float(r["value"][1])
                for r in vm.query(
                    f"tolaria_grad_agg_seed_norm{selector} and (timestamp(tolaria_grad_agg_seed_norm{selector}) >= "
                    f"ignoring(seed_id, stage) group_left() max without(seed_id, stage) "
                    f"(timestamp(tolaria_grad_agg_seed_norm{selector})))"
                )
            }
            assert seed_norms == pytest.approx({s: v.total_norm for s, v in summary.seeds.items()}, rel=1e-12)

            # The trainer's own budget, plain name (no unit suffix under -opentelemetry.usePrometheusNaming).
            def budget(want: float = 2.0 * len(summary.seeds)) -> bool:
                return [
                    float(r["value"][1]) for r in vm.query(f"tolaria_grad_agg_seed_layer_series_budget{selector}")
                ] == [want]

            wait_until(budget, timeout=10, message=f"epoch {summary.epoch}: series budget not top_k x seeds")
        assert vm.series(f'tolaria_grad_agg_seed_layer_info{{service_instance_id="{instance}", enabled="true"}}')
        # The labels: the point attributes plus the resource, nothing else (no job/instance on this path).
        for labels in vm.series(f"tolaria_grad_agg_seed_layer_norm{selector}"):
            assert set(labels) == {"__name__", "seed_id", "stage", "layer"} | PUSH_RESOURCE_LABELS
            assert labels["service_name"] == "tolaria-pipeline-test"
        assert sorted(run.summaries[-1].seeds) == ["seed-0", "seed-1"]
    finally:
        run.close()


# ----------------------------------------------------------------------------- 3. a top-K change, and its delay
def test_current_top_k_query_follows_a_top_k_change_within_the_bound(otel_env, vm):
    instance = f"topk-{uuid.uuid4().hex[:8]}"
    push_to(otel_env, vm, instance)
    run = Run(instance, seed_count=1, settings=SeedLayerSettings(enabled=True, top_k=1))
    selector = f'{{service_instance_id="{instance}"}}'
    try:
        run.tamper.scale = {"boost": (run.layer(0, "net.0"), 100.0)}
        first = run.epoch()
        assert [layer for layer, _ in first.seeds["seed-0"].top_layers] == ["net.0"]
        wait_until(
            lambda: set(as_layers(vm.query(current_top_k(selector)))) == {("seed-0", "TRAINING", "net.0")},
            timeout=10,
            message="first top-K not exported",
        )

        run.tamper.scale = {"boost": (run.layer(0, "net.4"), 100.0)}
        second = run.epoch()
        changed_at = time.monotonic()
        assert [layer for layer, _ in second.seeds["seed-0"].top_layers] == ["net.4"]
        new = {("seed-0", "TRAINING", "net.4")}
        wait_until(
            lambda: set(as_layers(vm.query(current_top_k(selector)))) == new,
            timeout=TOP_K_DELAY_BOUND_S,
            interval=0.05,
            message=f"new top-K not the only one within {TOP_K_DELAY_BOUND_S}s",
        )
        delay = time.monotonic() - changed_at
        print(
            f"\ncurrent top-K query showed only the new layer {delay:.2f}s after end_epoch() "
            f"(export interval {EXPORT_INTERVAL_MS} ms, bound {TOP_K_DELAY_BOUND_S:.1f}s)"
        )
        # The plain selector still answers the layer that left (VictoriaMetrics keeps the last sample):
        # the reason the documented query exists.
        plain = set(as_layers(vm.query(f"tolaria_grad_agg_seed_layer_norm{selector}")))
        assert plain == new | {("seed-0", "TRAINING", "net.0")}
    finally:
        run.close()


# ------------------------------------------------------------------ 2 + 4. pull mode, Prometheus, rules on real data
def prometheus_config_for(targets: list[str]) -> str:
    """collector/prometheus.yml with test intervals, the trainers' addresses and absolute rule paths."""
    text = PROMETHEUS_CONFIG.read_text()
    replacements = {
        "scrape_interval: 15s": "scrape_interval: 1s",
        "evaluation_interval: 15s": "evaluation_interval: 1s",
        "- rules/*.rules.yml": f"- {RULES_DIR}/*.rules.yml",
        "targets: ['127.0.0.1:9464']": f"targets: {targets!r}",
        # Nothing serves the Collector here; a closed port keeps that target quickly and plainly down.
        "targets: ['127.0.0.1:8889']": f"targets: ['127.0.0.1:{free_port()}']",
    }
    for old, new in replacements.items():
        assert text.count(old) == 1, f"collector/prometheus.yml no longer has {old!r}"
        text = text.replace(old, new)
    return text


def pull_run(monkeypatch: pytest.MonkeyPatch, instance: str, port: int) -> Run:
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "prometheus")
    monkeypatch.setenv("OTEL_EXPORTER_PROMETHEUS_HOST", "127.0.0.1")
    monkeypatch.setenv("OTEL_EXPORTER_PROMETHEUS_PORT", str(port))
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", f"service.instance.id={instance}")
    return Run(instance)


def promtool_test(tmp_path: Path, name: str, series: list[dict], alerts: list[tuple[str, int, list[dict]]]) -> None:
    """Run `promtool test rules` on series recorded from the real Prometheus, held for 20 minutes."""
    lines = [
        f"rule_files:\n  - {RULES_DIR / 'tolaria-seed-layers.rules.yml'}\n",
        "evaluation_interval: 1m\ntests:\n",
        f"  - name: {name}\n    interval: 1m\n    input_series:\n",
    ]
    for item in series:
        label_text = ", ".join(f'{k}="{v}"' for k, v in sorted(item["metric"].items()) if k != "__name__")
        lines.append(
            f"      - series: '{item['metric']['__name__']}{{{label_text}}}'\n        values: '{item['value'][1]}x20'\n"
        )
    # Empty expectations with alert_rule_test; firing ones through the ALERTS series (promtool compares
    # annotations in alert_rule_test, and they are the rule file's business, tested in collector/rules/tests).
    lines.append("    alert_rule_test:\n")
    for alertname, minute, expected in alerts:
        if not expected:
            lines.append(f"      - eval_time: {minute}m\n        alertname: {alertname}\n        exp_alerts: []\n")
    lines.append("    promql_expr_test:\n")
    for alertname, minute, expected in alerts:
        if expected:
            lines.append(
                f'      - expr: \'ALERTS{{alertname="{alertname}", alertstate="firing"}}\'\n'
                f"        eval_time: {minute}m\n        exp_samples:\n"
            )
            for labels in expected:
                body = ", ".join(
                    f'{k}="{v}"' for k, v in {"alertname": alertname, "alertstate": "firing", **labels}.items()
                )
                lines.append(f"          - labels: 'ALERTS{{{body}}}'\n            value: 1\n")
    test_file = tmp_path / f"{name}.test.yml"
    test_file.write_text("".join(lines))
    result = subprocess.run(
        [backend_binaries().promtool, "test", "rules", test_file],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n--- {test_file} ---\n{test_file.read_text()}"


ALERTS = (
    "TolariaSeedLayerNonFinite",
    "TolariaSeedLayerGradientExploding",
    "TolariaSeedGradientVanishing",
    "TolariaSeedLayerTelemetryAbsent",
)


def test_pull_mode_prometheus_series_and_alerts_on_real_data(otel_env, tmp_path):
    # One trainer per process in real life: the pull exporter serves prometheus_client's global registry, so
    # the healthy and the faulty trainer run one after the other, each on its own port (two targets).
    ports = {"healthy": free_port(), "faulty": free_port()}
    targets = {name: f"127.0.0.1:{port}" for name, port in ports.items()}
    runs: dict[str, Run] = {}
    recorded: dict[str, list[dict]] = {}
    with prometheus(prometheus_config_for(sorted(targets.values())), tmp_path / "prom") as prom:
        for name in ("healthy", "faulty"):
            run = runs[name] = pull_run(otel_env, f"{name}-{uuid.uuid4().hex[:8]}", ports[name])
            if name == "faulty":  # seed-1's first layer turns NaN, seed-2's last layer explodes (above 1000)
                run.tamper.nan = [run.layer(1, "net.0")]
                run.tamper.scale = {"explode": (run.layer(2, "net.4"), 1e6)}
            try:
                for _ in range(2):
                    run.epoch()
                selector = f'{{instance="{targets[name]}"}}'
                expected = expected_layers(run.summaries[-1])

                # 2. Same series and values as the in-process summary, job/instance added by Prometheus.
                def scraped(selector: str = selector, expected: dict = expected) -> dict | None:
                    got = as_layers(prom.query(current_top_k(selector)))
                    return got if got == pytest.approx(expected, rel=1e-12) else None

                prom.wait_for(scraped, message=f"{name}: latest epoch not scraped")
                for item in prom.query(f"tolaria_grad_agg_seed_layer_norm{selector}"):
                    assert item["metric"]["job"] == "tolaria-trainer"
                    assert item["metric"]["otel_scope_name"] == "tolaria_otel"
                    assert not PUSH_RESOURCE_LABELS & set(item["metric"])  # the resource is in target_info here
                for seed in run.summaries[-1].seeds.values():  # top_k points per seed, finite or not
                    assert len(seed.top_layers) == 2
                nonfinite = {
                    (r["metric"]["seed_id"], r["metric"]["layer"])
                    for r in prom.query(f"tolaria_grad_agg_seed_layer_nonfinite{selector}")
                }
                assert nonfinite == {
                    (seed_id, layer)
                    for seed_id, seed in run.summaries[-1].seeds.items()
                    for layer in seed.nonfinite_layers
                }

                if name == "healthy":
                    # 4a. Several rule evaluations on the healthy data: no alert at all, not even pending.
                    evaluated = time.time()

                    def rules_ran(selector: str = selector, evaluated: float = evaluated) -> bool:
                        recorded = prom.query(f"count(tolaria:seed_layer_norm:current{selector})")
                        return bool(recorded) and time.time() > evaluated + 3  # a few 1 s evaluations

                    prom.wait_for(rules_ran, message="rules not evaluated")
                    # A scrape taken before the first epoch ended sees the info gauge without any seed point:
                    # TolariaSeedLayerTelemetryAbsent pending (for: 30m), by design. Once the epochs are
                    # evaluated nothing may stay, not even pending.
                    prom.wait_for(lambda: not prom.alerts(), message="alerts on the healthy run")
                    assert prom.alerts() == []
                    # The volume check of docs/operations.md: stored per-layer series equal the trainer's budget.
                    budget = prom.query(f"tolaria:seed_layer_norm:budget{selector}")
                    assert [float(r["value"][1]) for r in budget] == [2.0 * len(run.summaries[-1].seeds)]
                    series = prom.query(f"tolaria:seed_layer_norm:series{selector}")

                    def labels(result: list[dict]) -> list[tuple[dict, str]]:
                        return [
                            ({k: v for k, v in r["metric"].items() if k != "__name__"}, r["value"][1]) for r in result
                        ]

                    assert labels(series) == labels(budget)  # same labels, same value
                else:
                    assert nonfinite == {("seed-1", "net.0")}
                    top_layer, top_norm = run.summaries[-1].seeds["seed-2"].top_layers[0]
                    assert top_layer == "net.4"
                    assert top_norm == pytest.approx(expected[("seed-2", "TRAINING", "net.4")])
                    assert expected[("seed-2", "TRAINING", "net.4")] > 1000
                    # 4a. Live: the non-finite alert (no `for`) fires; the exploding one is pending (for: 5m).
                    firing = prom.wait_for(
                        lambda: [a for a in prom.alerts() if a["state"] == "firing"],
                        message="TolariaSeedLayerNonFinite not firing",
                    )
                    assert {
                        (a["labels"]["alertname"], a["labels"]["instance"], a["labels"]["layer"]) for a in firing
                    } == {("TolariaSeedLayerNonFinite", targets[name], "net.0")}
                    exploding = prom.wait_for(
                        lambda: [
                            a for a in prom.alerts() if a["labels"]["alertname"] == "TolariaSeedLayerGradientExploding"
                        ],
                        message="TolariaSeedLayerGradientExploding not pending",
                    )
                    assert {(a["labels"]["seed_id"], a["labels"]["layer"], a["state"]) for a in exploding} == {
                        ("seed-2", "net.4", "pending")
                    }
                    assert not [a for a in prom.alerts() if a["labels"].get("instance") == targets["healthy"]]
                recorded[name] = prom.query(f'{{__name__=~"tolaria_grad_agg_seed.*", instance="{targets[name]}"}}')
            finally:
                run.close()

    # 4b. promtool over the series the real Prometheus recorded, held 20 minutes: every `for` runs out.
    scope = {
        "job": "tolaria-trainer",
        "instance": targets["faulty"],
        "otel_scope_name": "tolaria_otel",
        "otel_scope_version": recorded["faulty"][0]["metric"]["otel_scope_version"],
    }
    promtool_test(
        tmp_path,
        "faulty",
        recorded["faulty"],
        [
            (
                "TolariaSeedLayerNonFinite",
                0,
                [{"severity": "critical", **scope, "seed_id": "seed-1", "stage": "TRAINING", "layer": "net.0"}],
            ),
            ("TolariaSeedLayerGradientExploding", 4, []),
            (
                "TolariaSeedLayerGradientExploding",
                5,
                [{"severity": "warning", **scope, "seed_id": "seed-2", "stage": "TRAINING", "layer": "net.4"}],
            ),
            ("TolariaSeedGradientVanishing", 19, []),
            ("TolariaSeedLayerTelemetryAbsent", 19, []),
        ],
    )
    promtool_test(
        tmp_path, "healthy", recorded["healthy"], [(alert, minute, []) for alert in ALERTS for minute in (0, 5, 19)]
    )


# ------------------------------------------------------------------------------------------------------ 5. faults
def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Tiny CPU steps timed on a shared machine: one intra-op thread makes them far less noisy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_backend_down_at_start_killed_mid_run_and_back(otel_env, vm, tmp_path, caplog, one_torch_thread):
    epochs, steps = 8, 16
    # Reference: the same run exporting to a live store, interleaved epoch by epoch with the faulty one so
    # both see the same machine load (CI runners are noisy).
    push_to(otel_env, vm, f"reference-{uuid.uuid4().hex[:8]}")
    reference = Run("reference")
    # The faulty run: its store is down at start, comes up, is killed, and comes back on the same port.
    store = VictoriaMetrics(backend_binaries().victoria_metrics, tmp_path / "flaky-vm")
    instance = f"faults-{uuid.uuid4().hex[:8]}"
    push_to(otel_env, store, instance)
    selector = f'{{service_instance_id="{instance}"}}'
    run = Run(instance)
    rss: list[int] = []
    plan = {2: store.start, 4: store.kill, 6: store.start}  # before epochs 2, 4, 6
    try:
        for epoch in range(epochs):
            if epoch in plan:
                plan[epoch]()
            for each in (reference, run) if epoch % 2 else (run, reference):  # alternate who goes first
                each.epoch(steps=steps)
            rss.append(rss_bytes())
            if epoch in (3, 7):  # the store is up: metrics arrive (again)
                expected = expected_layers(run.summaries[-1])

                def arrived(expected: dict = expected) -> bool:
                    return as_layers(store.query(current_top_k(selector))) == pytest.approx(expected, rel=1e-12)

                wait_until(arrived, timeout=15, message=f"epoch {epoch} not exported after the store came back")
        store.kill()
        caplog.clear()
        for each in (run, reference):  # a last epoch with the store down: its export fails
            each.epoch(steps=steps)
        reference.close()
        started = time.monotonic()
        run.close()  # provider.shutdown() with the store down: the last epoch's export (in flight or its own) fails
        shutdown_s = time.monotonic() - started
    finally:
        store.stop()
    failed = ("Failed to export", "Transient error")
    assert any(r.getMessage().startswith(failed) for r in caplog.records), "the last epoch's export was not attempted"

    # Same results: the telemetry never depends on the exporter.
    assert [s.to_dict() for s in run.summaries] == [s.to_dict() for s in reference.summaries]
    # Step time: median over epochs, so one slow epoch on a busy machine does not decide.
    faulty_step, healthy_step = (sorted(r.step_seconds)[epochs // 2] for r in (run, reference))
    ratio = faulty_step / healthy_step
    growth = (max(rss[2:]) - rss[1]) / 2**20
    print(
        f"\nstore down/killed/back: step time ratio {ratio:.2f} vs healthy run ({faulty_step * 1e3:.2f} ms vs "
        f"{healthy_step * 1e3:.2f} ms per step, medians), RSS growth {growth:.1f} MiB after epoch 1, "
        f"shutdown with the store down {shutdown_s:.2f}s"
    )
    # The step time ratio is printed, not asserted: speed belongs to benchmarks (docs/benchmarks.md), and a ratio
    # of two timings on a shared 2-core machine is no bound. Equal summaries (above) are what training depends on.
    assert growth < 64
    # Not a guess at scheduling slack: with OTEL_EXPORTER_OTLP_TIMEOUT=1 ignored, the SDK's default 10 s timeout
    # would retry the refused final export after 1, 2 and 4 s (each -20 % at least): 5.6 s or more. Honoured, an
    # export in flight and the final one take at most the 1 s timeout each (measured: 0.0 to 1.0 s).
    assert shutdown_s < 5.6
