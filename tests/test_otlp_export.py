"""A realistic run exporting through the real OTLP exporters to receivers on local sockets."""

import pytest
import torch

from tolaria_otel import (
    LAYER_NONFINITE,
    LAYER_NORM,
    SEED_NORM,
    SeedLayerSettings,
    SeedLayerTelemetry,
    configure_meter_provider,
)

from .helpers import seeded_network, train_epoch
from .otlp_receiver import gauge_points, grpc_receiver, http_receiver


@pytest.mark.parametrize(("protocol", "receiver"), [("http/protobuf", http_receiver), ("grpc", grpc_receiver)])
def test_training_run_exports_the_in_process_summaries(monkeypatch, protocol, receiver):
    with receiver() as (endpoint, received):
        monkeypatch.setenv("OTEL_METRICS_EXPORTER", "otlp")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip")
        monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "600000")  # exports only when flushed below
        monkeypatch.setenv("OTEL_SERVICE_NAME", "tolaria-test")
        monkeypatch.setenv("TOLARIA_SEED_LAYER_SUMMARIES_ENABLED", "true")
        monkeypatch.setenv("TOLARIA_SEED_LAYER_TOPK", "2")

        model, kasmina = seeded_network(3)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        settings = SeedLayerSettings.from_env()
        provider = configure_meter_provider(settings)
        telemetry = SeedLayerTelemetry(model, kasmina, settings=settings, meter_provider=provider)
        telemetry.attach(optimizer)
        generator = torch.Generator().manual_seed(3)
        summaries = []
        for epoch in range(3):
            if epoch == 1:
                kasmina.stages["seed-1"] = "BLENDING"
            if epoch == 2:
                kasmina.remove("seed-2")
            train_epoch(model, optimizer, steps=4, accumulate=2, generator=generator)
            summaries.append(telemetry.end_epoch())
            assert provider.force_flush(10_000)
            request = received.wait_for(epoch + 1)[-1]
            points = gauge_points(request)
            summary = summaries[-1]
            assert LAYER_NONFINITE not in points
            assert {(a["seed_id"], a["stage"], a["layer"]): pytest.approx(v) for a, v, _ in points[LAYER_NORM]} == {
                (seed_id, seed.stage, layer): value
                for seed_id, seed in summary.seeds.items()
                for layer, value in seed.top_layers
            }
            assert {u for _, _, u in points[LAYER_NORM]} == {"grad"}
            assert {a["seed_id"]: v for a, v, _ in points[SEED_NORM]} == pytest.approx(
                {s: v.total_norm for s, v in summary.seeds.items()}
            )
        resource = {kv.key: kv.value.string_value for kv in request.resource_metrics[0].resource.attributes}
        assert resource["service.name"] == "tolaria-test"
        assert [sorted(s.seeds) for s in summaries] == [["seed-0", "seed-1", "seed-2"]] * 2 + [["seed-0", "seed-1"]]
        assert summaries[2].seeds["seed-1"].stage == "BLENDING"
        telemetry.close()
        provider.shutdown()


def test_close_then_shutdown_still_delivers_the_last_epoch(monkeypatch):
    """The README's order: telemetry.close(), then provider.shutdown(); the last epoch must arrive."""
    with http_receiver() as (endpoint, received):
        monkeypatch.setenv("OTEL_METRICS_EXPORTER", "otlp")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", endpoint)
        monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "600000")
        settings = SeedLayerSettings(enabled=True)
        provider = configure_meter_provider(settings)
        model, kasmina = seeded_network(1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        telemetry = SeedLayerTelemetry(model, kasmina, settings=settings, meter_provider=provider)
        telemetry.attach(optimizer)
        train_epoch(model, optimizer, steps=2, generator=torch.Generator().manual_seed(0))
        summary = telemetry.end_epoch()
        telemetry.close()
        provider.shutdown()
        delivered = [gauge_points(request).get(LAYER_NORM, []) for request in received.requests]
        assert {a["layer"]: v for a, v, _ in delivered[0]} == pytest.approx(dict(summary.seeds["seed-0"].top_layers))
