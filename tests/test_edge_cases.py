"""Odd seeds, odd names and a misbehaving seed source: handled, never raised into training."""

import logging
import math
import re

import pytest
import torch
from torch import nn

from tolaria_otel import LAYER_NORM, SEED_NORM, SEED_NOT_MEASURED, SeedLayerSettings, SeedLayerTelemetry

from .helpers import collect, layer_points, telemetry_for

ON = SeedLayerSettings(enabled=True, top_k=10)


def test_seed_without_trainable_parameters_is_not_measured():
    frozen = nn.Linear(2, 2).requires_grad_(False)
    telemetry, reader = telemetry_for(frozen, {"frozen": (frozen, "DORMANT"), "empty": (nn.ReLU(), "DORMANT")}, ON)
    telemetry.observe_step()
    summary = telemetry.end_epoch()
    assert {s: (v.top_layers, v.layer_count, v.total_norm, v.sampled_steps) for s, v in summary.seeds.items()} == {
        "empty": ((), 0, None, 1),
        "frozen": ((), 0, None, 1),
    }
    exported = collect(reader)
    assert LAYER_NORM not in exported and SEED_NORM not in exported
    assert sorted(a["seed_id"] for a, v, _ in exported[SEED_NOT_MEASURED] if v == 1) == ["empty", "frozen"]


def test_parameters_without_gradient_add_nothing_that_step():
    seed = nn.ModuleDict({"used": nn.Linear(2, 1, bias=False), "unused": nn.Linear(2, 1, bias=False)})
    telemetry, _ = telemetry_for(seed, {"s": (seed, "TRAINING")}, ON)
    seed["used"].weight.grad = torch.tensor([[3.0, 4.0]])
    telemetry.observe_step()  # "unused" has no gradient at all
    seed["unused"].weight.grad = torch.tensor([[0.0, 0.0]])
    telemetry.observe_step()
    seed["used"].weight.grad = None
    seed["unused"].weight.grad = torch.tensor([[6.0, 8.0]])
    telemetry.observe_step()  # and now "used" has none
    summary = telemetry.end_epoch()
    values = dict(summary.seeds["s"].top_layers)
    assert values["used"] == pytest.approx(math.sqrt((25 + 25) / 3))
    assert values["unused"] == pytest.approx(math.sqrt(100 / 3))
    assert summary.seeds["s"].total_norm == pytest.approx(math.sqrt((25 + 25 + 100) / 3))


def test_parameter_shared_with_host_and_between_seeds_and_tied_within_a_seed():
    shared = nn.Linear(2, 2, bias=False)
    seed_a = nn.Sequential(shared, nn.Linear(2, 2, bias=False))
    seed_b = nn.Module()
    seed_b.first = shared
    seed_b.second = nn.Linear(2, 2, bias=False)
    seed_b.tied = nn.Linear(2, 2, bias=False)
    seed_b.tied.weight = seed_b.second.weight  # the same Parameter in two layers of one seed
    host = nn.ModuleDict({"trunk": shared, "a": seed_a, "b": seed_b})
    telemetry, _ = telemetry_for(host, {"a": (seed_a, "TRAINING"), "b": (seed_b, "TRAINING")}, ON)
    shared.weight.grad = torch.full((2, 2), 1.0)  # norm 2
    seed_a[1].weight.grad = torch.full((2, 2), 2.0)  # norm 4
    seed_b.second.weight.grad = torch.full((2, 2), 3.0)  # norm 6
    telemetry.observe_step()
    summary = telemetry.end_epoch()
    assert dict(summary.seeds["a"].top_layers) == pytest.approx({"0": 2.0, "1": 4.0})
    assert dict(summary.seeds["b"].top_layers) == pytest.approx({"first": 2.0, "second": 6.0, "tied": 6.0})
    # each distinct parameter counts once in a seed's total, however many layers hold it
    assert summary.seeds["b"].total_norm == pytest.approx(math.sqrt(4 + 36))


@pytest.mark.parametrize("seed_id", ["séed-ü", "seed with spaces", "种子/7", "s" * 5000, "q\"uo'te\n"])
def test_unusual_seed_ids_and_module_names(seed_id):
    seed = nn.Module()
    seed.add_module("çouche 1", nn.Linear(2, 2))
    seed.add_module("x" * 300, nn.Linear(2, 2))
    telemetry, reader = telemetry_for(seed, {seed_id: (seed, "TRAINING")}, ON)
    for param in seed.parameters():
        param.grad = torch.ones_like(param)
    telemetry.observe_step()
    telemetry.end_epoch()
    assert set(layer_points(collect(reader)[LAYER_NORM])) == {(seed_id, "çouche 1"), (seed_id, "x" * 300)}


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ([("s", nn.Linear(1, 1))], "seed source returned list: expected a mapping seed_id -> \\(module, stage\\)"),
        ({"": (nn.Linear(1, 1), "TRAINING")}, "seed id '' is not valid: expected a non-empty str"),
        ({3: (nn.Linear(1, 1), "TRAINING")}, "seed id 3 is not valid: expected a non-empty str"),
        ({"s": nn.Linear(1, 1)}, "seed 's': expected a \\(torch.nn.Module, stage\\) pair"),
        (
            {"s": (nn.Linear(1, 1), None)},
            "seed 's': stage None is not valid: expected a non-empty str, an Enum member, or an int",
        ),
    ],
)
def test_malformed_seed_source_fails_fast_at_construction(source, message):
    with pytest.raises(TypeError, match=message):
        SeedLayerTelemetry(nn.Linear(1, 1), source, settings=ON)


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match=re.escape("model is str: expected a torch.nn.Module")):
        SeedLayerTelemetry("model", {}, settings=ON)  # type: ignore[arg-type]


def test_enum_stage_passes_its_name():
    import enum

    class SeedStage(enum.Enum):
        SEED_STAGE_BLENDING = 4

    seed = nn.Linear(1, 1)
    telemetry, _ = telemetry_for(seed, {"s": (seed, SeedStage.SEED_STAGE_BLENDING)}, ON)
    telemetry.observe_step()
    assert telemetry.end_epoch().seeds["s"].stage == "SEED_STAGE_BLENDING"


def test_seed_source_failing_mid_run_is_logged_and_last_stages_kept(caplog):
    seed = nn.Linear(1, 1)
    state = {"fail": False}

    def kasmina():
        if state["fail"]:
            raise RuntimeError("kasmina is restarting")
        return {"s": (seed, "TRAINING")}

    telemetry, _ = telemetry_for(seed, kasmina, ON)
    seed.weight.grad = torch.ones(1, 1)
    state["fail"] = True
    with caplog.at_level(logging.WARNING, logger="tolaria_otel"):
        telemetry.observe_step()  # read at the step: fails, so the seeds known last are measured
        summary = telemetry.end_epoch()  # read again: fails again
        telemetry.observe_step()
        telemetry.end_epoch()
    assert summary.seeds["s"].stage == "TRAINING"
    assert summary.seeds["s"].total_norm == pytest.approx(1.0) and summary.sampled_steps == 1
    assert telemetry.failures == 4
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "seed source failed" in warnings[0].getMessage()  # logged once, with traceback
    assert "kasmina is restarting" in caplog.text


def test_failing_gradient_read_never_reaches_training(caplog):
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(2))

        def parameters(self, recurse=True):  # Kasmina's module turns hostile after the layout was taken
            raise RuntimeError("module torn down")

    seed = nn.Linear(2, 2)
    modules: dict[str, nn.Module] = {"s": seed}
    telemetry, _ = telemetry_for(seed, lambda: {k: (m, "TRAINING") for k, m in modules.items()}, ON)
    modules["s"] = Broken()
    with caplog.at_level(logging.WARNING, logger="tolaria_otel"):
        telemetry.observe_step()
        telemetry.end_epoch()
    assert telemetry.failures >= 1
    assert "failed; training goes on" in caplog.text


def test_layers_added_or_frozen_in_place_are_picked_up_from_the_next_epoch():
    """The layout read at an epoch end serves the epoch that starts there (the step path never walks)."""
    seed = nn.Sequential(nn.Linear(2, 2, bias=False))
    telemetry, _ = telemetry_for(seed, {"s": (seed, "TRAINING")}, ON)

    def epoch() -> list[tuple[str, float]]:
        for index, layer in enumerate(seed):
            layer.weight.grad = torch.full((2, 2), float(index + 1))
        telemetry.observe_step()
        return list(telemetry.end_epoch().seeds["s"].top_layers)

    assert [layer for layer, _ in epoch()] == ["0"]
    seed.append(nn.Linear(2, 2, bias=False))  # the seed grows in place: same module object
    assert [layer for layer, _ in epoch()] == ["0"]  # this epoch's layout predates the growth
    top = epoch()  # zeroed in between
    assert [layer for layer, _ in top] == ["1", "0"]
    assert [value for _, value in top] == pytest.approx([4.0, 2.0])
    seed[0].requires_grad_(False)  # a layer is frozen
    epoch()
    assert [layer for layer, _ in epoch()] == ["1"]


def test_no_seed_yet_then_one_germinates():
    model = nn.Sequential(nn.Linear(2, 2))
    active: dict = {}
    telemetry, reader = telemetry_for(model, lambda: dict(active), ON)
    telemetry.observe_step()
    assert telemetry.end_epoch().seeds == {}
    assert LAYER_NORM not in collect(reader)
    active["s"] = (model[0], "GERMINATED")
    telemetry.observe_step()
    telemetry.end_epoch()  # read here: measured from the next epoch on
    model[0].weight.grad = torch.ones(2, 2)
    telemetry.observe_step()
    assert [layer for layer, _ in telemetry.end_epoch().seeds["s"].top_layers] == ["(root)"]


def test_gradients_of_a_create_graph_backward_are_measured_without_keeping_their_graph():
    seed = nn.Linear(3, 2)
    telemetry, _ = telemetry_for(seed, {"s": (seed, "TRAINING")}, ON)
    (seed(torch.randn(4, 3)) ** 2).sum().backward(create_graph=True)  # gradients that require grad
    assert seed.weight.grad.requires_grad
    expected = math.sqrt(sum((float(p.grad.detach().square().sum()) for p in seed.parameters()), 0.0))
    telemetry.observe_step()
    assert torch.is_grad_enabled()  # the caller's grad mode is back
    # A norm that required grad would keep the whole double-backward graph alive until the epoch end.
    waiting = [norm for group in telemetry._seeds.current.norms._groups for step in group.pending for norm in step]
    assert waiting and not any(norm.requires_grad for norm in waiting)
    assert telemetry.end_epoch().seeds["s"].total_norm == pytest.approx(expected, rel=1e-6)
