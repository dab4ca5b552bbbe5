"""Per-layer values, top-K, export semantics and determinism, against an independent reference."""

import logging
import math

import pytest
import torch

from tolaria_otel import (
    LAYER_NONFINITE,
    LAYER_NORM,
    SEED_NORM,
    SERIES_BUDGET,
    SETTINGS_INFO,
    SeedLayerSettings,
    SeedLayerTelemetry,
)
from tolaria_otel.export.instruments import SEED_NORM_MAX, SEED_STEP_NORM

from .helpers import (
    ReferenceNorms,
    collect,
    expected_top_k,
    layer_points,
    seeded_network,
    telemetry_for,
    train_epoch,
)

ON = SeedLayerSettings(enabled=True)


@pytest.mark.parametrize("seed_count", [2, 4])
@pytest.mark.parametrize("top_k", [1, 3, 50])
def test_exported_points_match_reference(seed_count, top_k):
    model, registry = seeded_network(seed_count)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    reference = ReferenceNorms(registry)
    optimizer.register_step_pre_hook(reference.hook)
    settings = ON.replace(top_k=top_k)
    telemetry, reader = telemetry_for(model, registry, settings)
    telemetry.attach(optimizer)
    generator = torch.Generator().manual_seed(1)

    for epoch in range(2):
        train_epoch(model, optimizer, steps=5, generator=generator)
        summary = telemetry.end_epoch()
        layers, totals = reference.epoch()
        exported = collect(reader)

        assert summary is not None and summary.epoch == epoch and summary.sampled_steps == 5
        assert list(summary.seeds) == sorted(registry.modules)
        points = exported[LAYER_NORM]
        for seed_id in registry.modules:
            seed_points = [(a, v, u) for a, v, u in points if a["seed_id"] == seed_id]
            want = expected_top_k(layers[seed_id], top_k)
            assert len(seed_points) == min(top_k, 3)  # each seed has 3 Linear layers
            assert [layer for layer, _ in summary.seeds[seed_id].top_layers] == [layer for layer, _ in want]
            for (attributes, value, unit), (layer, ref_value) in zip(
                sorted(seed_points, key=lambda p: p[0]["layer"]), sorted(want)
            ):
                assert attributes == {"seed_id": seed_id, "stage": "TRAINING", "layer": layer}
                assert unit == "grad"
                assert value == pytest.approx(ref_value, rel=1e-5)
            assert summary.seeds[seed_id].total_norm == pytest.approx(totals[seed_id], rel=1e-5)
            assert summary.seeds[seed_id].layer_count == 3
        seed_norms = {a["seed_id"]: (v, u) for a, v, u in exported[SEED_NORM]}
        assert {s: v for s, (v, _) in seed_norms.items()} == pytest.approx(totals, rel=1e-5)
        assert {u for _, u in seed_norms.values()} == {"grad"}
        assert LAYER_NONFINITE not in exported
        assert exported[SERIES_BUDGET] == [({}, min(top_k, 3) * seed_count, "")]  # exactly the points exported


def test_layer_names_follow_named_modules_and_root():
    torch.manual_seed(0)
    seed = torch.nn.Module()
    seed.bias = torch.nn.Parameter(torch.zeros(4))  # the seed's own parameter: layer "(root)"
    seed.block = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    telemetry, reader = telemetry_for(seed, {"s": (seed, "TRAINING")}, ON.replace(top_k=10))
    (seed.block(torch.randn(2, 4)) + seed.bias).sum().backward()
    telemetry.observe_step()
    summary = telemetry.end_epoch()
    assert sorted(layer for layer, _ in summary.seeds["s"].top_layers) == ["(root)", "block.0", "block.1"]
    assert sorted(layer for _, layer in layer_points(collect(reader)[LAYER_NORM])) == ["(root)", "block.0", "block.1"]


def test_dropped_layers_are_no_longer_exported():
    seed = torch.nn.Sequential(torch.nn.Linear(2, 2, bias=False), torch.nn.Linear(2, 2, bias=False))
    telemetry, reader = telemetry_for(seed, {"s": (seed, "TRAINING")}, ON.replace(top_k=1))
    for big in ("0", "1", "0"):
        for name, param in seed.named_parameters():
            param.grad = torch.full_like(param, 5.0 if name.startswith(big) else 1.0)
        telemetry.observe_step()
        telemetry.end_epoch()
        assert list(layer_points(collect(reader)[LAYER_NORM])) == [("s", big)]


def test_stage_change_and_culled_seed_are_current_in_export():
    model, registry = seeded_network(3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    telemetry, reader = telemetry_for(model, registry, ON)
    telemetry.attach(optimizer)
    generator = torch.Generator().manual_seed(2)
    train_epoch(model, optimizer, steps=2, generator=generator)
    telemetry.end_epoch()
    registry.stages["seed-0"] = "BLENDING"
    registry.remove("seed-2")
    train_epoch(model, optimizer, steps=2, generator=generator)
    summary = telemetry.end_epoch()
    stages = {(a["seed_id"], a["stage"]) for a, _, _ in collect(reader)[LAYER_NORM]}
    assert stages == {("seed-0", "BLENDING"), ("seed-1", "TRAINING")}
    assert {s: v.stage for s, v in summary.seeds.items()} == {"seed-0": "BLENDING", "seed-1": "TRAINING"}


def _run(seed: int) -> tuple[list, list]:
    model, registry = seeded_network(4, seed=seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    telemetry, reader = telemetry_for(model, registry, ON)
    telemetry.attach(optimizer)
    generator = torch.Generator().manual_seed(seed)
    summaries, exports = [], []
    for _ in range(3):
        train_epoch(model, optimizer, steps=4, generator=generator)
        summaries.append(telemetry.end_epoch())
        exports.append(sorted((sorted(a.items()), v) for a, v, _ in collect(reader)[LAYER_NORM]))
    return summaries, exports


def test_deterministic_run_after_run():
    first, second = _run(7), _run(7)
    assert first == second
    assert _run(8)[0] != first[0]


def test_ties_broken_by_layer_name():
    seed = torch.nn.ModuleDict({name: torch.nn.Linear(2, 2, bias=False) for name in ("c", "a", "b", "d")})
    telemetry, _ = telemetry_for(seed, {"s": (seed, "TRAINING")}, ON.replace(top_k=3))
    for name, module in seed.items():
        weight = module.get_parameter("weight")  # typed, where module.weight is Tensor | Module
        weight.grad = torch.full_like(weight, 2.0 if name == "d" else 1.0)
    telemetry.observe_step()
    summary = telemetry.end_epoch()
    assert [layer for layer, _ in summary.seeds["s"].top_layers] == ["d", "a", "b"]


def test_nonfinite_ranks_first_and_goes_to_nonfinite_gauge(caplog):
    seed = torch.nn.ModuleDict({name: torch.nn.Linear(2, 2, bias=False) for name in ("big", "inf", "nan", "small")})
    telemetry, reader = telemetry_for(seed, {"s": (seed, "TRAINING")}, ON.replace(top_k=3))
    fills = {"big": 100.0, "inf": math.inf, "nan": math.nan, "small": 0.1}
    for name, module in seed.items():
        weight = module.get_parameter("weight")  # typed, where module.weight is Tensor | Module
        weight.grad = torch.full_like(weight, fills[name])
    with caplog.at_level(logging.WARNING):
        telemetry.observe_step()
        summary = telemetry.end_epoch()
        exported = collect(reader)
    top = summary.seeds["s"].top_layers
    assert [layer for layer, _ in top] == ["inf", "nan", "big"]
    assert math.isinf(top[0][1]) and math.isnan(top[1][1]) and top[2][1] == pytest.approx(200.0)
    total = summary.seeds["s"].total_norm
    assert total is not None and math.isnan(total)
    assert summary.seeds["s"].nonfinite_layers == ("inf", "nan")
    assert {(a["layer"], v) for a, v, _ in exported[LAYER_NONFINITE]} == {("inf", 1), ("nan", 1)}
    assert layer_points(exported[LAYER_NORM]) == {("s", "big"): pytest.approx(200.0)}
    assert SEED_NORM not in exported  # a NaN total cannot be exported; the non-finite gauge says why
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_compact_mode_emits_seed_totals_only():
    model, registry = seeded_network(2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    telemetry, reader = telemetry_for(model, registry, ON.replace(compact=True))
    telemetry.attach(optimizer)
    train_epoch(model, optimizer, steps=2, generator=torch.Generator().manual_seed(0))
    summary = telemetry.end_epoch()
    exported = collect(reader)
    assert set(exported) == {SEED_NORM, SEED_NORM_MAX, SEED_STEP_NORM, SETTINGS_INFO, SERIES_BUDGET}
    assert exported[SERIES_BUDGET] == [({}, 0, "")]
    assert exported[SETTINGS_INFO] == [
        ({"enabled": "true", "top_k": "3", "compact": "true", "sample_every": "1"}, 1, "")
    ]
    assert {a["seed_id"]: v for a, v, _ in exported[SEED_NORM]} == pytest.approx(
        {s: v.total_norm for s, v in summary.seeds.items()}
    )
    assert {frozenset(a) for a, _, _ in exported[SEED_NORM]} == {frozenset({"seed_id", "stage"})}


def test_sample_every_measures_every_nth_step():
    model, registry = seeded_network(1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    reference = ReferenceNorms(registry)
    telemetry, _ = telemetry_for(model, registry, ON.replace(sample_every=3))
    telemetry.attach(optimizer)
    generator = torch.Generator().manual_seed(0)
    step = 0

    def sampled_reference() -> None:
        nonlocal step
        if step % 3 == 0:
            reference.hook(optimizer, (), {})
        step += 1

    train_epoch(model, optimizer, steps=7, generator=generator, before_step=sampled_reference)
    summary = telemetry.end_epoch()
    layers, _ = reference.epoch()
    assert summary.sampled_steps == 3  # steps 1, 4 and 7
    for layer, value in summary.seeds["seed-0"].top_layers:
        assert value == pytest.approx(layers["seed-0"][layer], rel=1e-5)


def test_gradient_accumulation_counts_optimizer_steps_not_micro_batches():
    model, registry = seeded_network(2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    reference = ReferenceNorms(registry)
    optimizer.register_step_pre_hook(reference.hook)
    telemetry, _ = telemetry_for(model, registry, ON)
    telemetry.attach(optimizer)
    train_epoch(model, optimizer, steps=3, accumulate=4, generator=torch.Generator().manual_seed(0))
    summary = telemetry.end_epoch()
    layers, _ = reference.epoch()
    assert summary.sampled_steps == 3
    for seed_id, seed in summary.seeds.items():
        for layer, value in seed.top_layers:
            assert value == pytest.approx(layers[seed_id][layer], rel=1e-5)


def test_global_provider_used_when_none_passed(monkeypatch):
    from opentelemetry import metrics

    from .helpers import metered

    provider, reader = metered(ON)
    monkeypatch.setattr(metrics, "get_meter_provider", lambda: provider)
    seed = torch.nn.Linear(2, 2)
    telemetry = SeedLayerTelemetry(seed, {"s": (seed, "TRAINING")}, settings=ON)
    seed(torch.ones(1, 2)).sum().backward()
    telemetry.observe_step()
    telemetry.end_epoch()
    assert layer_points(collect(reader)[LAYER_NORM]) == {("s", "(root)"): pytest.approx(math.sqrt(2 + 2 + 1 + 1))}


def test_close_detaches_and_stops_exporting():
    model, registry = seeded_network(1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    telemetry, reader = telemetry_for(model, registry, ON)
    telemetry.attach(optimizer)
    train_epoch(model, optimizer, steps=1, generator=torch.Generator().manual_seed(0))
    telemetry.end_epoch()
    assert collect(reader)[LAYER_NORM]
    telemetry.close()
    assert not optimizer._optimizer_step_post_hooks
    assert collect(reader)[LAYER_NORM]  # close() flushed the last epoch to the reader
    assert not collect(reader)  # then nothing, the settings info neither: nothing says "on" any more
    assert telemetry.end_epoch() is None


def test_registry_with_module_swapped_between_epochs():
    """A seed whose module Kasmina replaces is measured as the new module from the next step: the old
    module's gradient is never reported under the seed, and the new one's value is its own."""
    model, registry = seeded_network(1)
    telemetry, reader = telemetry_for(model, registry, ON)
    replacement = torch.nn.Linear(3, 3)
    registry.add("seed-0", replacement, "RESETTING")
    model.get_parameter("seeds.seed_0.net.0.weight").grad = torch.ones(32, 64)  # the old module's, after the swap
    telemetry.observe_step()
    swapped = telemetry.end_epoch()
    assert swapped.seeds["seed-0"].stage == "RESETTING"
    assert swapped.seeds["seed-0"].total_norm is None  # the new module had no gradient: not measured
    assert LAYER_NORM not in collect(reader)
    replacement(torch.ones(1, 3)).sum().backward()
    telemetry.observe_step()
    summary = telemetry.end_epoch()
    want = torch.cat([p.grad.double().flatten() for p in replacement.parameters()]).norm().item()
    assert summary.seeds["seed-0"].top_layers == (("(root)", pytest.approx(want, rel=1e-6)),)
    assert summary.seeds["seed-0"].total_norm == pytest.approx(want, rel=1e-6)
    assert layer_points(collect(reader)[LAYER_NORM]) == {("seed-0", "(root)"): pytest.approx(want, rel=1e-6)}
