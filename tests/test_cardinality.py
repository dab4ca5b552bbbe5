"""A long run with a rotating top-K, seeds coming and going and stage changes: bounded SDK state, no overflow."""

import logging
import random

import pytest
import torch

from tolaria_otel import LAYER_NORM, SEED_NORM, SeedLayerSettings, instruments

from .helpers import collect, layer_points, sdk_attribute_sets, telemetry_for

STAGES = ["GERMINATED", "TRAINING", "BLENDING", "SHADOWING", "PROBATIONARY", "FOSSILIZED"]


def _long_run(epochs: int, layers_per_seed: int, top_k: int, *, churn_every: int = 5) -> tuple[list[int], object]:
    """Kasmina's churn: a stage moves every epoch, a seed is culled and a new one germinates every
    ``churn_every`` epochs. Returns the SDK's attribute-set count after each epoch's collection."""
    rng = random.Random(0)
    seeds = {f"seed-{i}": torch.nn.ModuleList(torch.nn.Linear(1, 1, bias=False) for _ in range(layers_per_seed))
             for i in range(4)}
    active = {seed_id: (module, "GERMINATED") for seed_id, module in seeds.items()}
    telemetry, reader = telemetry_for(torch.nn.Module(), lambda: dict(active), SeedLayerSettings(enabled=True,
                                                                                                  top_k=top_k))
    next_seed = len(seeds)
    counts = []
    for epoch in range(epochs):
        for module, _ in active.values():
            for layer in module:
                layer.weight.grad = torch.full_like(layer.weight, rng.random())
        telemetry.observe_step()
        summary = telemetry.end_epoch()
        exported = collect(reader)
        assert not any("otel.metric.overflow" in attrs for points in exported.values() for attrs, _, _ in points)
        assert layer_points(exported[LAYER_NORM]) == {
            (seed_id, layer): pytest.approx(value) for seed_id, seed in summary.seeds.items()
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
    """The test above can fail: with the release switched off the small limit below is passed."""
    monkeypatch.setattr(instruments, "STREAM_CARDINALITY_LIMIT", 40)
    monkeypatch.setattr(instruments, "release_idle_attribute_sets", lambda instruments, keep: True)
    with pytest.raises(AssertionError):
        _long_run(epochs=60, layers_per_seed=12, top_k=3, churn_every=1)


def test_long_run_at_a_small_limit_never_overflows(monkeypatch):
    monkeypatch.setattr(instruments, "STREAM_CARDINALITY_LIMIT", 40)
    _, telemetry = _long_run(epochs=120, layers_per_seed=12, top_k=3)
    assert max(sdk_attribute_sets(telemetry, per_stream=True)) <= 40
