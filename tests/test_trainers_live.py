"""Four trainers in one process, on one MeterProvider, into a real VictoriaMetrics.

Esper runs several environments per process. Here four real training loops share the provider that
``configure_meter_provider()`` builds (OTLP/HTTP, the real exporter over a socket), each
``SeedLayerTelemetry`` with its identity ``{"env_id": ...}`` and the same seed ids. Every trainer's
points must arrive, stay apart by ``env_id`` in the backend, and show as one row per (trainer, seed,
layer) in the dashboards' queries, interpolated as Grafana does (helpers of tests/test_dashboards.py).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import pytest
import torch
import yaml

from devtools.stack import victoria_metrics
from tolaria_otel import EpochSummary, SeedLayerSettings, SeedLayerTelemetry, SeedSummary, configure_meter_provider
from tolaria_otel.demo.seeded_mlp import Seed

from .helpers import export_each_flush, seeded_network, train_epoch
from .test_dashboards import (
    DASHBOARD_FILE,
    RULES_FILE,
    VM_ARGS,
    Backend,
    dashboard_values,
    display_name,
    exported_series,
    interpolate,
    label_values_query,
    panel_target,
    settle,
    variable_value,
    variables,
)

pytestmark = pytest.mark.backend

ENV_IDS = ("0", "1", "2", "3")
SEEDS = ("seed-0", "seed-1", "seed-2")  # the same ids in every trainer
TOP_K = 2  # each seed has 3 layers: the top-K selects
EPOCHS = 2
STEPS = 2
UNMEASURED = ("3", "seed-2")  # env 3's seed-2 leaves the graph in the last epoch: not measured there
STAGE = "SEED_STAGE_TRAINING"


@dataclass
class Fleet:
    backend: Backend
    last: dict[str, EpochSummary]  # env_id -> the last epoch's summary


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with victoria_metrics(tmp_path_factory.mktemp("vm-trainers"), extra_args=VM_ARGS) as vm:
        with pytest.MonkeyPatch.context() as env:
            export_each_flush(env, vm.otlp_metrics_url, "tolaria-trainers-test", TOP_K)
            settings = SeedLayerSettings.from_env()
            provider = configure_meter_provider(settings)
        loops = []
        for index, env_id in enumerate(ENV_IDS):
            model, kasmina = seeded_network(len(SEEDS), seed=index)  # other weights, other norms, per trainer
            for seed_id in SEEDS:
                kasmina.stages[seed_id] = STAGE
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
            telemetry = SeedLayerTelemetry(
                model, kasmina, settings=settings, meter_provider=provider, attributes={"env_id": env_id}
            )
            telemetry.attach(optimizer)
            loops.append((env_id, model, kasmina, optimizer, telemetry, torch.Generator().manual_seed(index)))
        history: dict[str, list[EpochSummary]] = {env_id: [] for env_id in ENV_IDS}
        started = time.time()
        try:
            for epoch in range(EPOCHS):
                if epoch == EPOCHS - 1:
                    (kasmina_of_unmeasured,) = [k for e, _, k, *_ in loops if e == UNMEASURED[0]]
                    culled = cast(Seed, kasmina_of_unmeasured.modules[UNMEASURED[1]])  # the registry holds Seeds
                    culled.in_graph = False
                for _ in range(STEPS):  # the trainers' steps interleaved, as environments of one process
                    for _, model, _, optimizer, _, generator in loops:
                        train_epoch(model, optimizer, steps=1, generator=generator)
                for env_id, *_, telemetry, _ in loops:
                    summary = telemetry.end_epoch()
                    assert summary is not None
                    history[env_id].append(summary)
                assert provider.force_flush(10_000)
        finally:
            for *_, telemetry, _ in loops:
                telemetry.close()
            provider.shutdown()
        ended = settle(vm, sum(len(exported_series(summaries)) for summaries in history.values()))
        yield Fleet(Backend(vm.url, started, ended), {env_id: summaries[-1] for env_id, summaries in history.items()})


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD_FILE.read_text(encoding="utf-8"))


def expected_layers(fleet: Fleet, env_ids: tuple[str, ...] = ENV_IDS) -> dict[tuple[str, str, str], float]:
    """(env_id, seed, layer) -> the last epoch's value, for every top-K layer of every measured seed."""
    return {
        (env_id, seed.seed_id, layer): value
        for env_id in env_ids
        for seed in fleet.last[env_id].seeds.values()
        for layer, value in seed.top_layers
    }


def test_the_trainers_differ_and_one_seed_is_not_measured(fleet: Fleet) -> None:
    """What the checks below rely on: same seed ids, other values per trainer, one unmeasured seed."""
    for summary in fleet.last.values():
        assert tuple(summary.seeds) == SEEDS
    values = expected_layers(fleet)
    assert len(set(values.values())) == len(values)  # a point mixed up between trainers would show
    env_id, seed_id = UNMEASURED
    assert not fleet.last[env_id].seeds[seed_id].measured
    assert sum(not s.measured for summary in fleet.last.values() for s in summary.seeds.values()) == 1


def test_every_trainer_top_k_arrives_with_exact_values(fleet: Fleet) -> None:
    """The rules' current-top-K query (tolaria:seed_layer_norm:current, the same query for a store without the
    rules), per env_id: each trainer's latest top-K, nothing of the others, the values as exported."""
    (current,) = [
        rule["expr"]
        for group in yaml.safe_load(RULES_FILE.read_text())["groups"]
        for rule in group["rules"]
        if rule.get("record") == "tolaria:seed_layer_norm:current"
    ]
    result = fleet.backend.api("/api/v1/query", query=current, time=f"{fleet.backend.ended:.3f}")["result"]
    got: dict[tuple[str, str, str], float] = {}
    for row in result:
        labels = row["metric"]
        key = (labels["env_id"], labels["seed_id"], labels["layer"])
        assert key not in got, f"two series for {key}: {result}"
        assert labels["stage"] == STAGE
        got[key] = float(row["value"][1])
    want = expected_layers(fleet)
    assert got.keys() == want.keys()
    for key, value in want.items():  # VictoriaMetrics keeps a float64 to 1e-12 or better, not bit for bit
        assert got[key] == pytest.approx(value, rel=1e-12, abs=0), key


@pytest.mark.parametrize("env_selection", ["$__all", ["1", "3"], "2"])
def test_dashboard_table_and_totals_have_one_row_per_trainer_seed_and_layer(
    fleet: Fleet, dashboard: dict[str, Any], env_selection: list[str] | str
) -> None:
    env_ids = (
        ENV_IDS
        if env_selection == "$__all"
        else tuple([env_selection] if isinstance(env_selection, str) else env_selection)
    )
    values = dashboard_values(fleet.backend, dashboard, env_id=env_selection)

    panel, target = panel_target(dashboard, 4)  # latest top-K table
    rows = fleet.backend.run_target(target, interpolate(target["expr"], values))
    keys = [(r["metric"]["env_id"], r["metric"]["seed_id"], r["metric"]["layer"]) for r in rows]
    assert len(keys) == len(set(keys)), keys
    want = expected_layers(fleet, env_ids)
    assert {k: float(r["value"][1]) for k, r in zip(keys, rows)} == pytest.approx(want, rel=1e-12)

    panel, target = panel_target(dashboard, 6)  # per-seed totals
    series = fleet.backend.run_target(target, interpolate(target["expr"], values))
    totals = {(s["metric"]["env_id"], s["metric"]["seed_id"]): s for s in series}
    assert len(totals) == len(series)
    at_end = {key: float(s["values"][-1][1]) for key, s in totals.items() if s["values"][-1][0] == fleet.backend.ended}
    want_totals = {
        (env_id, seed.seed_id): seed.total_norm
        for env_id in env_ids
        for seed in fleet.last[env_id].seeds.values()
        if seed.measured
    }
    assert at_end == pytest.approx(want_totals, rel=1e-12)  # the unmeasured seed has no total at the end
    for key, s in totals.items():
        assert display_name(panel, target, s["metric"]) == f"env_id={key[0]} {key[1]}"

    panel, target = panel_target(dashboard, 10)  # seeds not measured
    unmeasured = fleet.backend.run_target(target, interpolate(target["expr"], values))
    want_unmeasured = {UNMEASURED} if UNMEASURED[0] in env_ids else set()
    assert {(r["metric"]["env_id"], r["metric"]["seed_id"]) for r in unmeasured} == want_unmeasured


def test_trainer_variable_lists_the_four_env_ids(fleet: Fleet, dashboard: dict[str, Any]) -> None:
    vars_ = variables(dashboard)
    selector, label = label_values_query(vars_["env_id"])
    assert sorted(fleet.backend.label_values(label, interpolate(selector, {}))) == list(ENV_IDS)
    seed_selector, label = label_values_query(vars_["seed_id"])
    chosen = {"env_id": variable_value(vars_["env_id"], ["0", "3"])}
    assert sorted(fleet.backend.label_values(label, interpolate(seed_selector, chosen))) == list(SEEDS)
    missing = {"env_id": variable_value(vars_["env_id"], "7")}
    assert fleet.backend.label_values(label, interpolate(seed_selector, missing)) == []


def spike_ratio(seed: SeedSummary) -> float:
    """A measured seed's max over RMS step norm, what the spikes panel plots."""
    assert seed.max_norm is not None and seed.total_norm is not None
    return seed.max_norm / seed.total_norm


def test_per_step_panels_keep_the_trainers_apart_and_the_ratio_says_the_host_is_not_measured(
    fleet: Fleet, dashboard: dict[str, Any]
) -> None:
    values = dashboard_values(fleet.backend, dashboard)
    for ref in ("A", "B"):  # p50, p99: every seed of every trainer had steps in the window
        panel, target = panel_target(dashboard, 11, ref)
        series = fleet.backend.run_target(target, interpolate(target["expr"], values))
        keys = [(s["metric"]["env_id"], s["metric"]["seed_id"]) for s in series]
        assert sorted(keys) == [(env_id, seed_id) for env_id in ENV_IDS for seed_id in SEEDS]
        quantile = {"A": "p50", "B": "p99"}[ref]
        assert {display_name(panel, target, s["metric"]) for s in series} == {
            f"env_id={env_id} {seed_id} {quantile}" for env_id, seed_id in keys
        }

    panel, target = panel_target(dashboard, 12)  # spikes: max / RMS of each trainer's last epoch
    series = fleet.backend.run_target(target, interpolate(target["expr"], values))
    at_end = {
        (s["metric"]["env_id"], s["metric"]["seed_id"]): float(s["values"][-1][1])
        for s in series
        if s["values"][-1][0] == fleet.backend.ended
    }
    assert at_end == pytest.approx(
        {
            (env_id, seed.seed_id): spike_ratio(seed)
            for env_id in ENV_IDS
            for seed in fleet.last[env_id].seeds.values()
            if seed.measured
        },
        rel=1e-9,
    )

    panel, target = panel_target(dashboard, 13)  # these trainers do not measure the host
    assert fleet.backend.run_target(target, interpolate(target["expr"], values)) == []
    assert "TOLARIA_SEED_HOST_NORM=true" in panel["fieldConfig"]["defaults"]["noValue"]
