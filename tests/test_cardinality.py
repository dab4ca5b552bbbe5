"""A long run with a rotating top-K, seeds coming and going and stage changes never overflows."""

import random

import pytest
import torch

from tolaria_otel import LAYER_NORM, SEED_NORM, SeedLayerSettings, instruments

from .helpers import collect, layer_points, telemetry_for

STAGES = ["GERMINATED", "TRAINING", "BLENDING", "SHADOWING", "PROBATIONARY", "FOSSILIZED"]


def _long_run(epochs: int, layers_per_seed: int, top_k: int) -> None:
    rng = random.Random(0)
    seeds = {f"seed-{i}": torch.nn.ModuleList(torch.nn.Linear(1, 1, bias=False) for _ in range(layers_per_seed))
             for i in range(4)}
    active = {seed_id: (module, "GERMINATED") for seed_id, module in seeds.items()}
    telemetry, reader = telemetry_for(torch.nn.Module(), lambda: dict(active), SeedLayerSettings(enabled=True,
                                                                                                  top_k=top_k))
    next_seed = len(seeds)
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
        # Kasmina's churn: a stage moves every epoch, a seed is culled and another germinates every 5.
        moved = rng.choice(sorted(active))
        active[moved] = (active[moved][0], rng.choice(STAGES))
        if epoch % 5 == 4:
            culled = rng.choice(sorted(active))
            module = active.pop(culled)[0]
            active[f"seed-{next_seed}"] = (module, "GERMINATED")
            next_seed += 1
    return telemetry


def test_long_run_renews_streams_before_the_limit(monkeypatch):
    monkeypatch.setattr(instruments, "STREAM_CARDINALITY_LIMIT", 40)
    telemetry = _long_run(epochs=120, layers_per_seed=12, top_k=3)
    assert telemetry._instruments.generation >= 3  # the limit was reached several times, never passed


def test_long_run_at_the_sdk_default_limit():
    assert instruments.STREAM_CARDINALITY_LIMIT == 2000
    telemetry = _long_run(epochs=400, layers_per_seed=20, top_k=5)
    assert telemetry._instruments.generation >= 1
