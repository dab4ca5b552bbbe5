"""Several trainers on one provider without an OpenTelemetry warning (issues 26.6, 26.8).

With a meter per trainer, the SDK warned "Views ... will cause conflicting metrics identities" for every
instrument a second trainer created (10 warnings per run with 2 environments, 42 with 4). The trainers now share
one meter and one set of instruments per provider, each keeping its own series, budget and loss-free export.
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from tolaria_otel import SeedLayerSettings, SeedLayerTelemetry, configure_meter_provider
from tolaria_otel.export.instruments import LAYER_NORM, LAYER_NORM_MAX, SEED_NORM, SEED_NORM_MAX, SERIES_BUDGET

from .helpers import collect, metered, seeded_network, train_epoch

ON = SeedLayerSettings(enabled=True, top_k=3)
EPOCHS = 3
TRAINERS = 4


def test_four_trainers_on_one_provider_train_epochs_without_an_sdk_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
    caplog.set_level(logging.DEBUG, logger="opentelemetry")
    reader = InMemoryMetricReader()
    with warnings.catch_warnings(record=True) as python_warnings:
        warnings.simplefilter("always")
        provider = configure_meter_provider(ON, readers=[reader])  # the package's views, as in production
        environments = []
        for env in range(TRAINERS):
            model, registry = seeded_network(2, seed=env)
            telemetry = SeedLayerTelemetry(
                model, registry, settings=ON, meter_provider=provider, attributes={"env_id": str(env)}
            )
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
            telemetry.attach(optimizer)
            environments.append((model, optimizer, telemetry))
        for epoch in range(EPOCHS):
            summaries = {}
            for env, (model, optimizer, telemetry) in enumerate(environments):
                train_epoch(model, optimizer, steps=2 + env, generator=torch.Generator().manual_seed(10 * epoch + env))
                summaries[str(env)] = telemetry.end_epoch()
            exported = collect(reader)
            want_layers = {
                (env, seed_id, layer): pytest.approx(value, rel=1e-6)
                for env, summary in summaries.items()
                for seed_id, seed in summary.seeds.items()
                for layer, value in seed.top_layers
            }
            got_layers = {(a["env_id"], a["seed_id"], a["layer"]): v for a, v, _ in exported[LAYER_NORM]}
            assert got_layers == want_layers and len(got_layers) == TRAINERS * 2 * ON.top_k
            assert len(exported[LAYER_NORM_MAX]) == TRAINERS * 2 * ON.top_k
            got_seeds = {(a["env_id"], a["seed_id"]): v for a, v, _ in exported[SEED_NORM]}
            assert got_seeds == {
                (env, seed_id): pytest.approx(seed.total_norm, rel=1e-6)
                for env, summary in summaries.items()
                for seed_id, seed in summary.seeds.items()
            }
            assert len(exported[SEED_NORM_MAX]) == TRAINERS * 2
            assert sorted((a["env_id"], v) for a, v, _ in exported[SERIES_BUDGET]) == [
                (str(env), 2 * ON.top_k) for env in range(TRAINERS)
            ]
        for _, _, telemetry in environments:
            telemetry.close()
        provider.shutdown()
    sdk_records = [r for r in caplog.records if r.name.startswith("opentelemetry") and r.levelno >= logging.WARNING]
    assert sdk_records == [], [r.getMessage() for r in sdk_records]
    assert [str(w.message) for w in python_warnings] == []


def test_one_meter_and_one_instrument_set_per_provider() -> None:
    provider, reader = metered(ON)
    for env in range(2):
        model, registry = seeded_network(1, seed=env)
        telemetry = SeedLayerTelemetry(
            model, registry, settings=ON, meter_provider=provider, attributes={"env_id": str(env)}
        )
        train_epoch(model, torch.optim.SGD(model.parameters(), lr=0.01), steps=1, generator=torch.Generator())
        telemetry.observe_step()
        telemetry.end_epoch()
    data = reader.get_metrics_data()
    assert data is not None
    scopes = [scope for rm in data.resource_metrics for scope in rm.scope_metrics]
    assert len(scopes) == 1 and scopes[0].scope.name == "tolaria_otel"
    names = [metric.name for metric in scopes[0].metrics]
    assert len(names) == len(set(names))  # one stream per instrument, the trainers' points in it


def test_each_trainer_keeps_its_own_cardinality_budget_on_the_shared_streams() -> None:
    """Two trainers at their full max_seeds on one provider whose views are sized for one: nothing overflows."""
    settings = SeedLayerSettings(enabled=True, top_k=1, max_seeds=20)
    provider, reader = metered(settings)
    telemetries = []
    stage = ["E0"]  # a new stage each epoch: every attribute set changes, and the previous snapshot is held too
    for env in range(2):
        model = torch.nn.ModuleDict({f"s{i:02d}": torch.nn.Linear(1, 1) for i in range(20)})

        def seeds(model: torch.nn.ModuleDict = model) -> dict[str, tuple[torch.nn.Module, str]]:
            return {seed_id: (module, stage[0]) for seed_id, module in model.items()}

        telemetry = SeedLayerTelemetry(
            model,
            seeds,
            settings=settings,
            meter_provider=provider,
            attributes={"env_id": str(env)},
        )
        telemetries.append((model, telemetry))
    for epoch in range(3):
        stage[0] = f"E{epoch}"
        for model, telemetry in telemetries:
            for parameter in model.parameters():
                parameter.grad = torch.full_like(parameter, epoch + 1.0)
            telemetry.observe_step()
            telemetry.end_epoch()
        exported = collect(reader)
        for name in (SEED_NORM, LAYER_NORM):
            assert not [a for a, _, _ in exported[name] if "otel.metric.overflow" in a], name
            assert len(exported[name]) == 2 * 20
