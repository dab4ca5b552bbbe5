"""A long run with a rotating top-K, seeds coming and going and stage changes: bounded SDK state, no overflow.
Many seeds: every seed the settings allow is exported, and a cut beyond them is said once (issue 17.6).
An SDK whose views take no cardinality limit (before 1.45.2) caps no stream: said once (issue 25.6)."""

import logging
import random

import pytest
import torch

from tolaria_otel import LAYER_NONFINITE, LAYER_NORM, SEED_NORM, SERIES_BUDGET, SeedLayerSettings, SeedLayerTelemetry
from tolaria_otel.config.settings import ENV_MAX_SEEDS, ENV_TOP_K, SettingsError
from tolaria_otel.export import instruments
from tolaria_otel.export.instruments import LAYER_NORM_MAX, SEED_STEP_NORM

from .helpers import (
    VIEWS_TAKE_CARDINALITY_LIMIT,
    besides_the_start_note,
    collect,
    layer_points,
    sdk_attribute_sets,
    telemetry_for,
)

STAGES = ["GERMINATED", "TRAINING", "BLENDING", "SHADOWING", "PROBATIONARY", "FOSSILIZED"]


def _long_run(
    epochs: int, layers_per_seed: int, top_k: int, *, churn_every: int = 5, max_seeds: int = 1000
) -> tuple[list[int], SeedLayerTelemetry]:
    """Kasmina's churn: a stage moves every epoch, a seed is culled and a new one germinates every
    ``churn_every`` epochs. Returns the SDK's attribute-set count after each epoch's collection."""
    rng = random.Random(0)
    seeds = {
        f"seed-{i}": torch.nn.ModuleList(torch.nn.Linear(1, 1, bias=False) for _ in range(layers_per_seed))
        for i in range(4)
    }
    active = {seed_id: (module, "GERMINATED") for seed_id, module in seeds.items()}
    settings = SeedLayerSettings(enabled=True, top_k=top_k, max_seeds=max_seeds)
    telemetry, reader = telemetry_for(torch.nn.Module(), lambda: dict(active), settings)
    next_seed = len(seeds)
    counts = []
    for epoch in range(epochs):
        for module, _ in active.values():
            for layer in module:
                weight = layer.get_parameter("weight")
                weight.grad = torch.full_like(weight, rng.random())
        telemetry.observe_step()
        summary = telemetry.end_epoch()
        exported = collect(reader)
        overflowed = any("otel.metric.overflow" in attrs for points in exported.values() for attrs, _, _ in points)
        assert not overflowed, f"epoch {epoch}: points folded into the otel.metric.overflow series"
        assert layer_points(exported[LAYER_NORM]) == {
            (seed_id, layer): pytest.approx(value)
            for seed_id, seed in summary.seeds.items()
            for layer, value in seed.top_layers
        }
        assert len(exported[SEED_NORM]) == len(summary.seeds)
        counts.append(sdk_attribute_sets(telemetry))
        moved = rng.choice(sorted(active))
        active[moved] = (active[moved][0], rng.choice(STAGES))
        if epoch % churn_every == churn_every - 1:
            culled = rng.choice(sorted(active))
            module = active.pop(culled)[0]
            active[f"seed-{next_seed}"] = (module, "GERMINATED")
            next_seed += 1
    return counts, telemetry


def test_sdk_state_stays_bounded_under_churn_with_every_point_exported(caplog):
    with caplog.at_level(logging.WARNING):
        counts, _ = _long_run(epochs=300, layers_per_seed=12, top_k=3, churn_every=1)
    # Current and previous snapshot at most: 2 x (4 seeds x 3 layers in layer_norm and layer_norm_max,
    # 4 seed totals in norm, norm_max and the step_norm histogram, info, budget).
    bound = 2 * (4 * 3 * 2 + 4 * 3 + 2)
    assert max(counts) <= bound
    assert max(counts[-50:]) <= bound  # flat: no growth with epochs or with the 300 seed ids seen
    assert not [r for r in caplog.records if r.name.startswith("opentelemetry")], caplog.text


def test_without_the_release_the_sdk_would_overflow(monkeypatch):
    """The tests above can fail: with the release switched off, the SDK's state grows with every seed id
    seen and, on an SDK whose views take a cardinality limit, streams sized for the 4 seeds present (current
    and previous snapshot) overflow as seed ids come and go."""
    monkeypatch.setattr(instruments, "release_idle_attribute_sets", lambda instruments, keep: True)
    counts, _ = _long_run(epochs=60, layers_per_seed=12, top_k=3, churn_every=1)
    assert counts[-1] > 5 * 2 * (4 * 3 * 2 + 4 * 3 + 2)  # five times the bound the release keeps
    if VIEWS_TAKE_CARDINALITY_LIMIT:
        with pytest.raises(AssertionError, match="points folded into the"):
            _long_run(epochs=60, layers_per_seed=12, top_k=3, churn_every=1, max_seeds=4)


def test_an_sdk_without_cardinality_limits_is_said_once_at_start(monkeypatch, caplog):
    """Where the SDK's views take no cardinality limit, the views are built without one and the first
    build in a process says once that the package's settings alone bound the series; the run exports
    everything all the same. An SDK that takes one is said nothing of."""
    monkeypatch.setattr(instruments, "_warned_no_limit", [])  # as in a fresh process
    with caplog.at_level(logging.WARNING, logger="tolaria_otel"):
        for top_k in (3, 5):  # two providers in one process: said at the first only
            exported, summary = _many_seeds(4, 6, SeedLayerSettings(enabled=True, top_k=top_k, max_seeds=10))
            assert layer_points(exported[LAYER_NORM]) == pytest.approx(
                {(seed_id, layer): value for seed_id, seed in summary.seeds.items() for layer, value in seed.top_layers}
            )
            assert exported[SERIES_BUDGET] == [({}, 4 * top_k, "")]
    said = [record.getMessage() for record in caplog.records]
    if VIEWS_TAKE_CARDINALITY_LIMIT:
        assert said == []
    else:
        assert said == [
            "tolaria_otel: this OpenTelemetry SDK's views take no cardinality limit: "
            f"{ENV_MAX_SEEDS} and {ENV_TOP_K} are the only bound on the series (a per-seed stream holds at "
            "most 20 attribute sets, a per-layer one 60) (said once)"
        ]


def test_long_run_with_streams_sized_for_the_seeds_present_never_overflows():
    _, telemetry = _long_run(epochs=120, layers_per_seed=12, top_k=3, max_seeds=4)
    seed_limit, layer_limit = instruments.stream_limits(SeedLayerSettings(top_k=3, max_seeds=4))
    assert (seed_limit, layer_limit) == (8, 24)
    assert max(sdk_attribute_sets(telemetry, per_stream=True)) <= layer_limit


def _many_seeds(seeds: int, layers: int, settings: SeedLayerSettings, epochs: int = 1):
    """``seeds`` seeds of ``layers`` one-weight layers, each layer's gradient its own value; the exported
    points of the last epoch and its summary."""
    modules = {
        f"seed-{i:04d}": torch.nn.ModuleList(torch.nn.Linear(1, 1, bias=False) for _ in range(layers))
        for i in range(seeds)
    }
    for i, module in enumerate(modules.values()):
        for j, layer in enumerate(module):
            weight = layer.get_parameter("weight")
            weight.grad = torch.full_like(weight, 1.0 + i + j / layers)
    telemetry, reader = telemetry_for(torch.nn.Module(), {s: (m, "TRAINING") for s, m in modules.items()}, settings)
    for _ in range(epochs):
        telemetry.observe_step()
        summary = telemetry.end_epoch()
        exported = collect(reader)
    return exported, summary


def test_a_thousand_seeds_of_five_layers_export_every_top_k_layer(caplog):
    """Issue 17.6: on main 333 of these seeds exported no layer point (a fixed 2,000-point stream limit)
    while series_budget said 3,000. Every seed's top 3 now arrives, nothing overflows, nothing is said."""
    with caplog.at_level(logging.WARNING):
        exported, summary = _many_seeds(1000, 5, SeedLayerSettings(enabled=True, top_k=3))
    assert len(summary.seeds) == 1000
    want = {(seed_id, layer): value for seed_id, seed in summary.seeds.items() for layer, value in seed.top_layers}
    assert len(want) == 3000
    assert layer_points(exported[LAYER_NORM]) == pytest.approx(want)
    assert len(exported[LAYER_NORM_MAX]) == 3000 and len(exported[SEED_NORM]) == 1000
    assert len(exported[SEED_STEP_NORM]) == 1000
    assert exported[SERIES_BUDGET] == [({}, 3000, "")]
    assert not any("otel.metric.overflow" in attrs for points in exported.values() for attrs, _, _ in points)
    assert not besides_the_start_note(caplog.records), caplog.text


def test_seeds_beyond_max_seeds_are_cut_whole_and_said_once(caplog):
    """The cut a limit makes is whole seeds (the first by seed id stay), said once with the setting that
    lifts it, and the budget gauge says what is exported."""
    settings = SeedLayerSettings(enabled=True, top_k=3, max_seeds=10)
    with caplog.at_level(logging.WARNING, logger="tolaria_otel"):
        exported, summary = _many_seeds(12, 5, settings, epochs=3)
    assert len(summary.seeds) == 12  # Tamiyo gets them all
    kept = sorted(summary.seeds)[:10]
    assert {a["seed_id"] for a, _, _ in exported[SEED_NORM]} == set(kept)
    assert {a["seed_id"] for a, _, _ in exported[LAYER_NORM]} == set(kept)
    assert {a["seed_id"] for a, _, _ in exported[SEED_STEP_NORM]} == set(kept)
    assert exported[SERIES_BUDGET] == [({}, 30, "")]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert ENV_MAX_SEEDS in warnings[0] and "12 seeds" in warnings[0] and "'seed-0010'" in warnings[0]


def test_series_budget_is_what_is_exported_when_seeds_have_fewer_layers_than_top_k():
    """On main the budget said top_k x seeds (9 here) while 3 seeds of 2 layers export 6 points."""
    exported, _ = _many_seeds(3, 2, SeedLayerSettings(enabled=True, top_k=3))
    assert len(exported[LAYER_NORM]) + len(exported.get(LAYER_NONFINITE, [])) == 6
    assert exported[SERIES_BUDGET] == [({}, 6, "")]


def test_top_k_above_100_is_accepted_as_esper_accepts_it():
    """On main TOLARIA_SEED_LAYER_TOPK=150 failed the trainer's start; a seed of 120 layers exports all 120."""
    settings = SeedLayerSettings.from_env({"TOLARIA_SEED_LAYER_SUMMARIES_ENABLED": "true", ENV_TOP_K: "150"})
    assert settings.top_k == 150
    exported, _ = _many_seeds(2, 120, settings)
    assert len(exported[LAYER_NORM]) == 240 and exported[SERIES_BUDGET] == [({}, 240, "")]
    with pytest.raises(SettingsError, match=ENV_MAX_SEEDS):
        SeedLayerSettings.from_env({ENV_MAX_SEEDS: "0"})
