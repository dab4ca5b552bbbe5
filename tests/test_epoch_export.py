"""Every epoch reaches the exporter at least once, whatever the export interval (issue 25.3).

The instruments are gauges of the latest epoch read at each collection: at the default 60 s interval, of five
short epochs only the last reached the store, silently. Each epoch end now starts an export off the training
thread (``export/epoch_export.py``). The first test is the real path: the OTLP/HTTP exporter of a
``PeriodicExportingMetricReader`` at ``OTEL_METRIC_EXPORT_INTERVAL=60000`` into a real VictoriaMetrics, every
epoch's value queried back with its own sample. The others use an in-process exporter to see each export.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from opentelemetry.sdk.metrics.export import (
    MetricExporter,
    MetricExportResult,
    MetricsData,
    PeriodicExportingMetricReader,
)

from devtools.stack import VictoriaMetrics, victoria_metrics, wait_until
from tolaria_otel import SeedLayerSettings, SeedLayerTelemetry, configure_meter_provider, seed_layer_views
from tolaria_otel.export.instruments import SEED_NORM

ON = SeedLayerSettings(enabled=True, top_k=2)
EPOCHS = 5


def _one_seed() -> tuple[torch.nn.Linear, dict[str, tuple[torch.nn.Module, str]]]:
    seed = torch.nn.Linear(2, 2)
    return seed, {"s": (seed, "TRAINING")}


def _epoch(telemetry: SeedLayerTelemetry, seed: torch.nn.Module, value: float) -> float:
    """One step whose every gradient element is ``value``: the seed's norm is ``value * sqrt(6)``."""
    for parameter in seed.parameters():
        parameter.grad = torch.full_like(parameter, value)
    telemetry.observe_step()
    summary = telemetry.end_epoch()
    assert summary is not None and summary.seeds["s"].total_norm is not None
    return summary.seeds["s"].total_norm


def _export_idle(telemetry: SeedLayerTelemetry) -> bool:
    shared = getattr(telemetry._instruments, "_shared", None)  # None before the epoch's export existed
    return shared is None or bool(shared.epoch_export.idle)


@pytest.fixture(scope="module")
def vm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VictoriaMetrics]:
    with victoria_metrics(Path(tmp_path_factory.mktemp("vm-epochs"))) as server:
        yield server


@pytest.mark.backend
def test_five_epochs_under_a_60_s_interval_all_reach_victoria_metrics(
    vm: VictoriaMetrics, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = "epoch-export"
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", vm.otlp_metrics_url)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "60000")
    monkeypatch.setenv("OTEL_SERVICE_NAME", service)
    provider = configure_meter_provider(ON)
    seed, seeds = _one_seed()
    telemetry = SeedLayerTelemetry(seed, seeds, settings=ON, meter_provider=provider)
    want = []
    for epoch in range(EPOCHS):
        want.append(_epoch(telemetry, seed, float(epoch + 1)))
        # An epoch lasts longer than a local export takes: wait for that, not for a time.
        wait_until(lambda: _export_idle(telemetry), timeout=20, message=f"epoch {epoch}'s export never ended")
    selector = f'tolaria_grad_agg_seed_norm{{service_name="{service}"}}'

    def stored() -> list[float]:
        return sorted({float(v) for series in vm.export(selector) for v in series["values"]})

    got = wait_until(
        lambda: (values := stored()) and len(values) == EPOCHS and values,
        timeout=20,  # well before the 60 s interval's first export
        message=f"VictoriaMetrics holds {stored()}, want one sample of each of {want}",
    )
    assert got == pytest.approx(sorted(want), rel=1e-6)
    telemetry.close()
    provider.shutdown()


class _Recording(MetricExporter):
    """An in-process exporter: every export's seed norms; ``gate`` held closed makes an export wait."""

    def __init__(self) -> None:
        super().__init__()
        self.exports: list[list[float]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.waiting = threading.Event()

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: object) -> MetricExportResult:
        values = [
            float(point.value)
            for rm in metrics_data.resource_metrics
            for scope in rm.scope_metrics
            for metric in scope.metrics
            if metric.name == SEED_NORM
            for point in metric.data.data_points
        ]
        self.waiting.set()
        self.gate.wait(30)
        self.exports.append(values)
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: object) -> None:
        self.gate.set()


def _pushing(settings: SeedLayerSettings = ON):
    from opentelemetry.sdk.metrics import MeterProvider

    exporter = _Recording()
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=60_000)
    return MeterProvider(metric_readers=[reader], views=seed_layer_views(settings)), exporter


def test_exports_in_flight_are_coalesced_and_the_epoch_end_never_waits(caplog: pytest.LogCaptureFixture) -> None:
    provider, exporter = _pushing()
    seed, seeds = _one_seed()
    telemetry = SeedLayerTelemetry(seed, seeds, settings=ON, meter_provider=provider)
    exporter.gate.clear()  # the collector hangs
    first = _epoch(telemetry, seed, 1.0)
    wait_until(exporter.waiting.is_set, timeout=20, message="epoch 0's export never started")
    # The export hangs with epoch 0 collected; the training thread goes on: these return while it hangs.
    _epoch(telemetry, seed, 2.0)  # replaced by the next before any collection: said once
    third = _epoch(telemetry, seed, 3.0)
    assert not exporter.exports  # still hanging: nothing above waited for it
    exporter.gate.set()
    wait_until(lambda: _export_idle(telemetry), timeout=20, message="the coalesced export never ended")
    assert exporter.exports == [[pytest.approx(first)], [pytest.approx(third)]]  # two exports for three epochs
    lost = [r for r in caplog.records if "was replaced by the next before any collection" in r.getMessage()]
    assert len(lost) == 1 and lost[0].levelno == logging.WARNING
    assert "epoch 1 " in lost[0].getMessage() and "shorter than one export takes" in lost[0].getMessage()
    telemetry.close()
    provider.shutdown()


def test_export_each_epoch_false_leaves_the_exports_to_the_interval_and_says_what_it_costs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    provider, exporter = _pushing()
    seed, seeds = _one_seed()
    telemetry = SeedLayerTelemetry(seed, seeds, settings=ON, meter_provider=provider, export_each_epoch=False)
    for epoch in range(3):
        _epoch(telemetry, seed, float(epoch + 1))
    assert exporter.exports == []  # the 60 s interval has not come
    assert _export_idle(telemetry)
    lost = [r.getMessage() for r in caplog.records if "before any collection" in r.getMessage()]
    assert len(lost) == 1 and "export_each_epoch=False leaves the exports to it" in lost[0]
    telemetry.close()
    provider.shutdown()
    assert len(exporter.exports) == 1  # the shutdown's final export: the last epoch


def test_pull_mode_says_once_that_an_epoch_not_scraped_is_not_pushed(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "prometheus")
    monkeypatch.setenv("OTEL_EXPORTER_PROMETHEUS_HOST", "127.0.0.1")
    monkeypatch.setenv("OTEL_EXPORTER_PROMETHEUS_PORT", "0")
    provider = configure_meter_provider(ON)
    seed, seeds = _one_seed()
    telemetry = SeedLayerTelemetry(seed, seeds, settings=ON, meter_provider=provider)
    for epoch in range(4):  # nobody scrapes
        _epoch(telemetry, seed, float(epoch + 1))
    assert _export_idle(telemetry)  # nothing to push in pull mode
    lost = [r for r in caplog.records if "before any collection" in r.getMessage()]
    assert len(lost) == 1 and lost[0].levelno == logging.WARNING
    assert "in pull mode an epoch the scrape did not read cannot be pushed" in lost[0].getMessage()
    telemetry.close()
    provider.shutdown()
