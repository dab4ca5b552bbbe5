"""Esper's loop shapes: seeds germinated and culled at any step, modules swapped, optimizers replaced,
several trainers in one process, stages as Kasmina gives them, threads. Against an independent reference."""

from __future__ import annotations

import enum
import logging
import math
import re
import threading
from collections import defaultdict
from typing import cast

import pytest
import torch
from torch import nn

from tolaria_otel import (
    LAYER_NORM,
    SEED_NORM,
    SEED_NOT_MEASURED,
    EpochSummary,
    SeedLayerSettings,
    SeedLayerTelemetry,
)
from tolaria_otel.demo.seeded_mlp import SeededMLP, SeedRegistry

from .helpers import collect, expected_top_k, metered, telemetry_for

ON = SeedLayerSettings(enabled=True, top_k=2)


class PresenceReference:
    """The contract, the plain way, in float64: read the seed source at the step, measure what it lists.

    A seed's epoch value is the RMS over the steps at which it was listed; it is not measured when none
    of its parameters had a gradient at any of them. Every seed listed at some step of the epoch belongs
    to it, with the last stage it was listed with.
    """

    def __init__(self, source) -> None:
        self.source = source
        self.reset()

    def reset(self) -> None:
        self.squares: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.totals: dict[str, float] = defaultdict(float)
        self.steps: dict[str, int] = defaultdict(int)
        self.had: dict[str, bool] = defaultdict(bool)
        self.stages: dict[str, str] = {}

    def step(self) -> None:
        for seed_id, (module, stage) in self.source().items():
            self.steps[seed_id] += 1
            self.stages[seed_id] = stage
            seen: dict[int, torch.Tensor] = {}
            for name, sub in module.named_modules():
                params = [p for p in sub.parameters(recurse=False) if p.requires_grad]
                if not params:
                    continue
                self.squares[seed_id][name or "(root)"] += sum(
                    float(p.grad.double().pow(2).sum()) for p in params if p.grad is not None
                )
                seen.update((id(p), p.grad) for p in params if p.grad is not None)
            self.totals[seed_id] += sum(float(g.double().pow(2).sum()) for g in seen.values())
            self.had[seed_id] |= bool(seen)

    def epoch(self) -> dict[str, tuple[int, float | None, dict[str, float], str, bool]]:
        """seed -> (steps listed, total RMS or None, layer -> RMS, last stage, gone at the end) for every seed
        listed at some step, then reset."""
        listed_at_end = self.source()
        out = {}
        for seed_id, steps in self.steps.items():
            total = math.sqrt(self.totals[seed_id] / steps) if self.had[seed_id] else None
            out[seed_id] = (
                steps,
                total,
                {k: math.sqrt(v / steps) for k, v in self.squares[seed_id].items()},
                listed_at_end[seed_id][1] if seed_id in listed_at_end else self.stages[seed_id],
                seed_id not in listed_at_end,
            )
        self.reset()
        return out


def assert_matches(summary, want, top_k: int) -> None:
    assert sorted(summary.seeds) == sorted(want)
    for seed_id, (steps, total, layers, stage, left) in want.items():
        got = summary.seeds[seed_id]
        assert got.sampled_steps == steps, seed_id
        assert (got.stage, got.left) == (stage, left), seed_id
        if total is None:
            assert got.total_norm is None and got.top_layers == (), seed_id
            continue
        assert got.total_norm == pytest.approx(total, rel=1e-5), seed_id
        want_top = expected_top_k(layers, top_k)
        assert [layer for layer, _ in got.top_layers] == [layer for layer, _ in want_top], seed_id
        assert [v for _, v in got.top_layers] == pytest.approx([v for _, v in want_top], rel=1e-5)


class Controller:
    """Tamiyo consulted at every step: germinates and culls on a fixed plan (step index -> action)."""

    def __init__(self, model: SeededMLP, registry: SeedRegistry, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.registry, self.optimizer = model, registry, optimizer

    def germinate(self, seed_id: str, hidden: int = 16) -> None:
        module = self.model.graft(seed_id.replace("-", "_"), hidden=hidden)
        self.optimizer.add_param_group({"params": list(module.parameters())})
        self.registry.add(seed_id, module, "SEED_STAGE_GERMINATED")

    def cull(self, seed_id: str) -> None:
        self.registry.remove(seed_id)
        del self.model.seeds[seed_id.replace("-", "_")]


def _train(model, optimizer, steps: int, generator, at_step=None, reference=None) -> None:
    for step in range(steps):
        if at_step is not None:
            at_step(step)
        x, y = torch.randn(16, 32, generator=generator), torch.randn(16, 10, generator=generator)
        nn.functional.mse_loss(model(x), y).backward()
        if reference is not None:
            reference.step()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("attach", ["optimizer", "every_optimizer", "observe_step"])
def test_seeds_germinated_after_end_epoch_and_mid_epoch_are_measured_at_once(attach):
    torch.manual_seed(0)
    model, registry = SeededMLP(), SeedRegistry()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    controller = Controller(model, registry, optimizer)
    controller.germinate("seed-0")
    telemetry, _ = telemetry_for(model, registry, ON)
    reference = PresenceReference(registry)
    if attach == "optimizer":
        telemetry.attach(optimizer)
    elif attach == "every_optimizer":
        telemetry.attach()
    generator = torch.Generator().manual_seed(1)

    def train(steps, plan):
        for step in range(steps):
            for action, seed_id in plan.get(step, ()):
                getattr(controller, action)(seed_id)
            x, y = torch.randn(16, 32, generator=generator), torch.randn(16, 10, generator=generator)
            nn.functional.mse_loss(model(x), y).backward()
            reference.step()
            if attach == "observe_step":
                telemetry.observe_step()
            optimizer.step()
            optimizer.zero_grad()

    train(4, {})
    want = reference.epoch()
    assert_matches(telemetry.end_epoch(), want, ON.top_k)
    controller.germinate("seed-1")  # Tamiyo read the summary and germinated: measured from the next step
    train(6, {2: [("germinate", "seed-2")], 4: [("cull", "seed-0")]})
    want = reference.epoch()
    summary = telemetry.end_epoch()
    assert_matches(summary, want, ON.top_k)
    assert {s: v.sampled_steps for s, v in summary.seeds.items()} == {"seed-0": 4, "seed-1": 6, "seed-2": 4}
    assert summary.seeds["seed-0"].left  # culled mid-epoch: its last summary covers its four steps
    train(3, {})
    assert_matches(telemetry.end_epoch(), reference.epoch(), ON.top_k)
    telemetry.close()  # attach() without an optimizer hooks every optimizer of the process until then


def _two_germinated_seeds() -> tuple[SeededMLP, SeedRegistry, torch.optim.SGD, Controller]:
    """A host with seed-0 and seed-1 germinated, the SGD that trains them, and the controller that did it."""
    torch.manual_seed(0)
    model, registry = SeededMLP(), SeedRegistry()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    controller = Controller(model, registry, optimizer)
    for seed_id in ("seed-0", "seed-1"):
        controller.germinate(seed_id)
    return model, registry, optimizer, controller


def test_culled_seed_stops_being_measured_at_the_first_step_it_is_gone():
    model, registry, optimizer, _ = _two_germinated_seeds()
    culled_module = registry.modules["seed-1"]
    telemetry, _ = telemetry_for(model, registry, ON)
    telemetry.attach(optimizer)
    generator = torch.Generator().manual_seed(3)

    def at_step(step):
        if step == 2:
            registry.remove("seed-1")  # Kasmina forgets it, but the module stays in the graph

    _train(model, optimizer, 5, generator, at_step)
    registry.add("seed-1", culled_module, "SEED_STAGE_GERMINATED")  # back, just before the epoch end
    summary = telemetry.end_epoch()
    assert summary.seeds["seed-1"].sampled_steps == 2  # steps 0 and 1 only, though it trained in all 5
    assert summary.seeds["seed-0"].sampled_steps == 5


def test_module_swapped_under_the_same_seed_id_mid_epoch_counts_the_modules_in_the_seed_at_each_step():
    torch.manual_seed(0)
    model, registry = SeededMLP(), SeedRegistry()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    controller = Controller(model, registry, optimizer)
    controller.germinate("seed-0")
    telemetry, _ = telemetry_for(model, registry, ON.replace(top_k=5))
    reference = PresenceReference(registry)
    generator = torch.Generator().manual_seed(5)

    def at_step(step):
        if step == 3:  # Kasmina resets the seed: a fresh module under the same id, the old one stays in the graph
            fresh = model.graft("seed_0_reset", hidden=8)
            optimizer.add_param_group({"params": list(fresh.parameters())})
            registry.add("seed-0", fresh, "SEED_STAGE_RESETTING")

    for step in range(6):
        at_step(step)
        x, y = torch.randn(16, 32, generator=generator), torch.randn(16, 10, generator=generator)
        nn.functional.mse_loss(model(x), y).backward()
        reference.step()
        telemetry.observe_step()
        optimizer.step()
        optimizer.zero_grad()
    assert_matches(telemetry.end_epoch(), reference.epoch(), 5)


def test_optimizer_replaced_mid_run_is_followed_by_attach_without_an_optimizer():
    torch.manual_seed(0)
    model, registry = SeededMLP(), SeedRegistry()
    registry.add("seed-0", model.graft("seed_0"), "SEED_STAGE_TRAINING")
    telemetry, _ = telemetry_for(model, registry, ON)
    telemetry.attach()
    reference = PresenceReference(registry)
    generator = torch.Generator().manual_seed(2)
    optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    _train(model, optimizer, 3, generator, reference=reference)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)  # the optimizer manager swaps it
    _train(model, optimizer, 4, generator, reference=reference)
    unrelated = nn.Linear(2, 2)
    other = torch.optim.SGD(unrelated.parameters(), lr=0.1)  # another trainer's optimizer: not counted
    unrelated(torch.ones(1, 2)).sum().backward()
    other.step()
    summary = telemetry.end_epoch()
    assert summary.sampled_steps == 7
    assert_matches(summary, reference.epoch(), ON.top_k)
    telemetry.close()


def test_several_optimizers_stepping_on_the_same_gradients_count_once():
    torch.manual_seed(0)
    model, registry = SeededMLP(), SeedRegistry()
    registry.add("seed-0", model.graft("seed_0"), "SEED_STAGE_TRAINING")
    telemetry, _ = telemetry_for(model, registry, ON)
    handle = telemetry.attach()
    host = torch.optim.SGD([p for n, p in model.named_parameters() if not n.startswith("seeds.")], lr=0.01)
    seeds = torch.optim.Adam(model.seeds.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        model(torch.randn(4, 32, generator=generator)).sum().backward()
        host.step()
        seeds.step()
        host.zero_grad()
        seeds.zero_grad()
    assert telemetry.end_epoch().sampled_steps == 5
    handle.remove()
    model(torch.randn(4, 32, generator=generator)).sum().backward()
    host.step()
    assert telemetry.end_epoch().sampled_steps == 0


def test_closure_optimizer_is_measured_after_the_closure():
    torch.manual_seed(0)
    seed = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    registry = {"s": (seed, "SEED_STAGE_TRAINING")}
    telemetry, _ = telemetry_for(seed, registry, ON)
    optimizer = torch.optim.LBFGS(seed.parameters(), max_iter=3)
    telemetry.attach(optimizer)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    final: list[float] = []

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(seed(x), y)
        loss.backward()
        return loss

    for _ in range(2):
        optimizer.step(closure)
        final.append(sum((float(p.grad.double().pow(2).sum()) for p in seed.parameters()), 0.0))
    summary = telemetry.end_epoch()
    assert summary.sampled_steps == 2
    assert summary.seeds["s"].total_norm == pytest.approx(math.sqrt(sum(final) / 2), rel=1e-5)


def test_attach_refuses_what_is_not_an_optimizer():
    seed = nn.Linear(2, 2)
    telemetry, _ = telemetry_for(seed, {"s": (seed, "TRAINING")}, ON)
    with pytest.raises(TypeError, match=re.escape("attach() got dict: expected a torch.optim.Optimizer")):
        telemetry.attach({"lr": 0.1})

    class Wrapper:  # accelerate's AcceleratedOptimizer, Lightning's LightningOptimizer: an inner .optimizer
        def __init__(self, optimizer):
            self.optimizer = optimizer

    inner = torch.optim.SGD(seed.parameters(), lr=0.1)
    telemetry.attach(Wrapper(Wrapper(inner)))
    seed(torch.ones(1, 2)).sum().backward()
    inner.step()
    assert telemetry.end_epoch().sampled_steps == 1


class Stage(enum.IntEnum):  # a protobuf enum's values, as Kasmina's SeedStage gives them
    SEED_STAGE_UNKNOWN = 0
    SEED_STAGE_GERMINATED = 2
    SEED_STAGE_TRAINING = 3


def test_int_stages_named_by_the_users_mapping_or_callable():
    seed = nn.Linear(2, 2)
    names = {stage.value: stage.name for stage in Stage}
    for stage_names in (names, lambda value: Stage(value).name):
        source = {"s": (seed, int(Stage.SEED_STAGE_TRAINING))}
        provider, reader = metered(ON)
        telemetry = SeedLayerTelemetry(seed, source, settings=ON, meter_provider=provider, stage_names=stage_names)
        seed(torch.ones(1, 2)).sum().backward()
        telemetry.observe_step()
        assert telemetry.end_epoch().seeds["s"].stage == "SEED_STAGE_TRAINING"
        assert {a["stage"] for a, _, _ in collect(reader)[LAYER_NORM]} == {"SEED_STAGE_TRAINING"}
        seed.zero_grad()


def test_int_stage_without_names_is_refused_at_construction():
    seed = nn.Linear(2, 2)
    with pytest.raises(TypeError, match="stage 3 is an int, but no stage_names were given"):
        telemetry_for(seed, {"s": (seed, 3)}, ON)


@pytest.mark.parametrize("names", [{3: 7}, {}, lambda value: None])
def test_stage_names_giving_no_string_is_refused(names):
    seed = nn.Linear(2, 2)
    provider, _ = metered(ON)
    with pytest.raises(TypeError, match=r"stage_names gave .* for stage 3: expected a non-empty str"):
        SeedLayerTelemetry(seed, {"s": (seed, 3)}, settings=ON, meter_provider=provider, stage_names=names)


def test_stage_names_failing_mid_run_is_logged_and_training_goes_on(caplog):
    seed = nn.Linear(2, 2)
    stage = {"value": 3}
    provider, _ = metered(ON)
    telemetry = SeedLayerTelemetry(
        seed,
        lambda: {"s": (seed, stage["value"])},
        settings=ON,
        meter_provider=provider,
        stage_names={3: "SEED_STAGE_TRAINING"},
    )
    seed(torch.ones(1, 2)).sum().backward()
    telemetry.observe_step()
    stage["value"] = 9  # Kasmina moved to a stage the mapping does not know
    with caplog.at_level(logging.WARNING, logger="tolaria_otel"):
        summary = telemetry.end_epoch()
    assert summary.seeds["s"].stage == "SEED_STAGE_TRAINING"  # the stage known last
    assert "seed source failed" in caplog.text


def test_seed_with_no_gradient_in_the_epoch_is_not_measured_never_zero():
    torch.manual_seed(0)
    model, registry = SeededMLP(), SeedRegistry()
    registry.add("live", model.graft("live"), "SEED_STAGE_TRAINING")
    embargoed = model.graft("embargoed")
    registry.add("embargoed", embargoed, "SEED_STAGE_EMBARGOED")
    zero = model.graft("zero")
    zero.alpha = 0.0  # in the graph with a zero weight: a real, exactly zero gradient
    registry.add("zero", zero, "SEED_STAGE_TRAINING")
    del model.seeds["embargoed"]  # out of the graph: no gradient at all
    telemetry, reader = telemetry_for(model, registry, ON)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    telemetry.attach(optimizer)
    _train(model, optimizer, 3, torch.Generator().manual_seed(0))
    summary = telemetry.end_epoch()
    assert summary.seeds["embargoed"].total_norm is None and summary.seeds["embargoed"].top_layers == ()
    assert summary.seeds["embargoed"].sampled_steps == 3
    assert summary.seeds["zero"].total_norm == 0.0  # measured, and zero: a vanishing gradient
    assert summary.to_dict()["seeds"][0]["total_norm"] is None  # "embargoed" sorts first
    exported = collect(reader)
    assert {a["seed_id"] for a, _, _ in exported[SEED_NORM]} == {"live", "zero"}
    assert {a["seed_id"] for a, _, _ in exported[LAYER_NORM]} == {"live", "zero"}
    assert [(a["seed_id"], a["stage"], v) for a, v, _ in exported[SEED_NOT_MEASURED]] == [
        ("embargoed", "SEED_STAGE_EMBARGOED", 1)
    ]


def test_four_trainers_on_one_provider_each_export_all_their_points():
    provider, reader = metered(ON)
    trainers = []
    for env in range(4):
        torch.manual_seed(env)
        model, registry = SeededMLP(), SeedRegistry()
        for i in range(2):
            registry.add(f"seed-{i}", model.graft(f"seed_{i}"), "SEED_STAGE_TRAINING")
        telemetry = SeedLayerTelemetry(
            model, registry, settings=ON, meter_provider=provider, attributes={"env_id": str(env)}
        )
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        telemetry.attach(optimizer)
        _train(model, optimizer, 2, torch.Generator().manual_seed(env))
        trainers.append(telemetry.end_epoch())
    exported = collect(reader)
    got = {(a["env_id"], a["seed_id"], a["layer"]): v for a, v, _ in exported[LAYER_NORM]}
    want = {
        (str(env), seed_id, layer): pytest.approx(value)
        for env, summary in enumerate(trainers)
        for seed_id, seed in summary.seeds.items()
        for layer, value in seed.top_layers
    }
    assert got == want and len(got) == 4 * 2 * ON.top_k
    assert len({tuple(sorted(a)) for a, _, _ in exported[LAYER_NORM]}) == 1  # same keys everywhere


def test_trainer_identity_collisions_are_refused_at_construction():
    provider, reader = metered(ON)
    seed = nn.Linear(2, 2)
    first = SeedLayerTelemetry(seed, {}, settings=ON, meter_provider=provider, attributes={"env_id": "0"})
    with pytest.raises(ValueError, match="attributes \\{'env_id': '0'\\} is open on this meter provider"):
        SeedLayerTelemetry(seed, {}, settings=ON, meter_provider=provider, attributes={"env_id": "0"})
    with pytest.raises(ValueError, match="'seed_id' is one of the package's own attributes"):
        SeedLayerTelemetry(seed, {}, settings=ON, meter_provider=provider, attributes={"seed_id": "x"})
    with pytest.raises(TypeError, match="attributes\\['env_id'\\] = 3: expected non-empty str keys and str values"):
        SeedLayerTelemetry(seed, {}, settings=ON, meter_provider=provider, attributes={"env_id": 3})  # type: ignore[dict-item]
    closed = SeedLayerTelemetry(seed, {}, settings=ON, meter_provider=provider, attributes={"env_id": "1"})
    closed.close()  # frees its identity for a trainer that takes over, which exports from then on
    collect(reader)  # the closed trainer's last collection
    successor = SeedLayerTelemetry(
        seed, {"s": (seed, "TRAINING")}, settings=ON, meter_provider=provider, attributes={"env_id": "1"}
    )
    seed(torch.ones(1, 2)).sum().backward()
    successor.observe_step()
    successor.end_epoch()
    assert [(a["env_id"], a["seed_id"]) for a, _, _ in collect(reader)[SEED_NORM]] == [("1", "s")]
    assert first.enabled


@pytest.mark.parametrize(
    ("argument", "value", "message"),
    [
        ("settings", {"enabled": True}, "settings is dict: expected a SeedLayerSettings"),
        ("meter_provider", "localhost:4318", "meter_provider is str: expected an OpenTelemetry MeterProvider"),
        ("stage_names", 3, "stage_names is int: expected a mapping int -> str"),
        ("attributes", ["env_id"], "attributes is list: expected a mapping str -> str"),
    ],
)
def test_wrong_argument_types_name_the_argument(argument, value, message):
    with pytest.raises(TypeError, match=message):
        SeedLayerTelemetry(nn.Linear(1, 1), {}, **{argument: value})


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16, torch.complex64])
def test_a_seed_with_another_gradient_dtype_is_measured_and_others_unaffected(dtype):
    plain = nn.Linear(3, 3, bias=False)
    odd = nn.Linear(3, 3, bias=False).to(dtype)
    telemetry, _ = telemetry_for(plain, {"plain": (plain, "TRAINING"), "odd": (odd, "TRAINING")}, ON)
    plain.weight.grad = torch.full((3, 3), 2.0)
    odd.weight.grad = torch.full((3, 3), 1.0, dtype=dtype)
    telemetry.observe_step()
    summary = telemetry.end_epoch()
    assert summary.seeds["plain"].total_norm == pytest.approx(6.0)
    assert summary.seeds["odd"].total_norm == pytest.approx(3.0, rel=1e-3)


def test_a_sparse_gradient_is_measured_exactly():
    embedding = nn.Embedding(10, 3, sparse=True)
    dense = nn.Linear(3, 1)
    seed = nn.ModuleDict({"embedding": embedding, "dense": dense})
    telemetry, _ = telemetry_for(seed, {"s": (seed, "TRAINING")}, ON.replace(top_k=3))
    references = []
    for tokens in ([1, 1, 2], [4, 5, 5]):
        dense(embedding(torch.tensor(tokens))).sum().backward()
        references.append(
            {
                "embedding": float(embedding.weight.grad.to_dense().pow(2).sum()),
                "dense": sum((float(p.grad.pow(2).sum()) for p in dense.parameters()), 0.0),
            }
        )
        telemetry.observe_step()
        seed.zero_grad()
    summary = telemetry.end_epoch()
    assert dict(summary.seeds["s"].top_layers) == pytest.approx(
        {layer: math.sqrt(sum(r[layer] for r in references) / 2) for layer in ("embedding", "dense")}, rel=1e-5
    )
    assert telemetry.failures == 0


def test_observe_step_and_end_epoch_from_two_threads_lose_nothing():
    """A trainer stepping from an optimizer hook while a background thread ends epochs: every sampled
    step lands in exactly one epoch, with its exact value."""
    seed = nn.Linear(64, 64, bias=False)
    telemetry, _ = telemetry_for(seed, {"s": (seed, "TRAINING")}, ON)
    seed.weight.grad = torch.full((64, 64), 1.0)  # norm 64 at every step
    steps = 3000
    summaries: list[EpochSummary | None] = []
    stop = threading.Event()

    def ender():
        while not stop.is_set():
            summaries.append(telemetry.end_epoch())

    thread = threading.Thread(target=ender)
    thread.start()
    for _ in range(steps):
        telemetry.observe_step()
    stop.set()
    thread.join()
    summaries.append(telemetry.end_epoch())
    sampled = [summary.sampled_steps for summary in summaries]
    assert sum(sampled) == steps
    for summary in summaries:
        if summary.sampled_steps:
            assert summary.seeds["s"].total_norm == pytest.approx(64.0)


def test_a_parameter_that_left_its_device_is_detected_before_any_work():
    """The CPU side of following a model to another device (benchmarks/gpu.py checks the CUDA round trip):
    the step path notices the move before touching the old accumulators, and the new layout is keyed
    by device, so the next sampled step measures where the gradients now are."""
    from tolaria_otel.measure.seeds import read_seeds
    from tolaria_otel.measure.segment import segment_key
    from tolaria_otel.measure.step_norms import DeviceMoved, StepNorms

    seed = nn.Linear(2, 2)
    squares = StepNorms(list(seed.parameters()), [(0, 0, None), (1, 0, None)], 1, torch.device("cpu"))
    before = segment_key(read_seeds({"s": (seed, "TRAINING")}))
    torch.utils.swap_tensors(seed.weight, nn.Parameter(torch.empty(2, 2, device="meta")))  # as .to(device) can
    with pytest.raises(DeviceMoved):
        squares.add_step()
    assert segment_key(read_seeds({"s": (seed, "TRAINING")})) != before


def test_a_seed_culled_mid_epoch_keeps_that_epoch_in_the_summary_and_the_export_then_is_released():
    """Kasmina drops a culled seed from its registry at once: listed at steps 0 to 4, gone at step 5 of 8."""
    model, registry, optimizer, controller = _two_germinated_seeds()
    telemetry, reader = telemetry_for(model, registry, ON)
    telemetry.attach(optimizer)
    reference = PresenceReference(registry)

    def at_step(step):
        if step == 4:
            registry.stages["seed-1"] = "SEED_STAGE_CULLED"  # Tamiyo culls: its last step is this one
        if step == 5:
            controller.cull("seed-1")

    _train(model, optimizer, 8, torch.Generator().manual_seed(4), at_step, reference)
    want = reference.epoch()
    assert want["seed-1"][0] == 5 and want["seed-1"][3:] == ("SEED_STAGE_CULLED", True)
    summary = telemetry.end_epoch()
    assert_matches(summary, want, ON.top_k)
    assert not summary.seeds["seed-0"].left
    assert summary.to_dict()["seeds"][1]["left"] is True
    exported = collect(reader)
    assert {(a["seed_id"], a["stage"]) for a, _, _ in exported[LAYER_NORM]} == {
        ("seed-0", "SEED_STAGE_GERMINATED"),
        ("seed-1", "SEED_STAGE_CULLED"),
    }
    _train(model, optimizer, 2, torch.Generator().manual_seed(5), reference=reference)
    summary = telemetry.end_epoch()
    assert sorted(summary.seeds) == ["seed-0"]  # released after its last epoch
    assert {a["seed_id"] for a, _, _ in collect(reader)[LAYER_NORM]} == {"seed-0"}


def test_a_parameter_replaced_inside_a_seed_is_followed_at_the_next_check_and_the_epoch_flagged_partial():
    from tolaria_otel.measure.seed_tracker import PARAMETER_CHECK_EVERY

    torch.manual_seed(0)
    model, registry = SeededMLP(), SeedRegistry()
    for seed_id in ("seed-0", "seed-1"):
        registry.add(seed_id, model.graft(seed_id.replace("-", "_")), "SEED_STAGE_TRAINING")
    telemetry, _ = telemetry_for(model, registry, ON.replace(top_k=5))
    layer = cast(nn.Linear, registry.modules["seed-0"].get_submodule("net.0"))
    replaced_at, steps = 3, PARAMETER_CHECK_EVERY + 6
    weight: list[float] = []  # seed-0's net.0 per step, float64, on the parameters the module holds
    bias: list[float] = []
    generator = torch.Generator().manual_seed(6)
    for step in range(steps):
        if step == replaced_at:  # re-initialised: a new nn.Parameter in the same module object
            layer.weight = nn.Parameter(torch.randn_like(layer.weight))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)  # the manager rebuilds it every step
        x, y = torch.randn(16, 32, generator=generator), torch.randn(16, 10, generator=generator)
        nn.functional.mse_loss(model(x), y).backward()
        weight.append(float(layer.weight.grad.double().pow(2).sum()))
        bias.append(float(layer.bias.grad.double().pow(2).sum()))
        telemetry.observe_step()
        optimizer.step()
        model.zero_grad(set_to_none=True)
    summary = telemetry.end_epoch()
    seed = summary.seeds["seed-0"]
    assert seed.partial and not summary.seeds["seed-1"].partial

    # Until a check finds it, at most PARAMETER_CHECK_EVERY sampled steps later, the old weight is measured
    # (it has no gradient after the replacement); from the step after that check, the new one.
    def partial_value(followed_from: int) -> float:
        measured = [w for step, w in enumerate(weight) if step < replaced_at or step >= followed_from]
        return math.sqrt((sum(measured) + sum(bias)) / steps)

    candidates = [partial_value(step) for step in range(replaced_at + 1, replaced_at + PARAMETER_CHECK_EVERY + 1)]
    net_0 = seed.layer_norms["net.0"]
    assert any(net_0 == pytest.approx(value, rel=1e-5) for value in candidates)
    assert net_0 is not None and net_0 < 0.9 * math.sqrt((sum(weight) + sum(bias)) / steps)
    # The next epoch measures the new parameter at every step, and is not partial.
    squares = []
    for _ in range(3):
        x, y = torch.randn(16, 32, generator=generator), torch.randn(16, 10, generator=generator)
        nn.functional.mse_loss(model(x), y).backward()
        squares.append(sum((float(p.grad.double().pow(2).sum()) for p in layer.parameters(recurse=False)), 0.0))
        telemetry.observe_step()
        model.zero_grad(set_to_none=True)
    seed = telemetry.end_epoch().seeds["seed-0"]
    assert not seed.partial
    assert seed.layer_norms["net.0"] == pytest.approx(math.sqrt(sum(squares) / 3), rel=1e-5)


def test_a_second_attach_is_refused_until_the_first_is_removed():
    model, registry = SeededMLP(), SeedRegistry()
    registry.add("seed-0", model.graft("seed_0"), "SEED_STAGE_TRAINING")
    telemetry, _ = telemetry_for(model, registry, ON)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    handle = telemetry.attach(optimizer)
    for second in (lambda: telemetry.attach(optimizer), telemetry.attach):
        with pytest.raises(RuntimeError, match=r"attach\(\) was already called .* remove the first handle"):
            second()
    _train(model, optimizer, 4, torch.Generator().manual_seed(0))
    assert telemetry.end_epoch().sampled_steps == 4  # each step once
    handle.remove()
    telemetry.attach(optimizer)
    _train(model, optimizer, 2, torch.Generator().manual_seed(0))
    assert telemetry.end_epoch().sampled_steps == 2


def test_a_seed_outside_the_model_is_named_once(caplog):
    model, registry = SeededMLP(), SeedRegistry()
    registry.add("inside", model.graft("inside"), "SEED_STAGE_TRAINING")
    elsewhere = SeededMLP().graft("elsewhere")  # another network's seed, never in this model's forward
    registry.add("elsewhere", elsewhere, "SEED_STAGE_TRAINING")
    with caplog.at_level(logging.WARNING, logger="tolaria_otel"):
        telemetry, _ = telemetry_for(model, registry, ON)
        telemetry.attach()
        _train(model, torch.optim.SGD(model.parameters(), lr=0.01), 2, torch.Generator().manual_seed(0))
        summary = telemetry.end_epoch()
    warnings = [r.getMessage() for r in caplog.records if "not inside the model" in r.getMessage()]
    assert len(warnings) == 1 and "'elsewhere'" in warnings[0] and "'inside'" not in warnings[0]
    assert summary.seeds["elsewhere"].total_norm is None
    late = model.graft("late")  # grafted into the model after construction: inside, no warning
    registry.add("late", late, "SEED_STAGE_GERMINATED")
    with caplog.at_level(logging.WARNING, logger="tolaria_otel"):
        caplog.clear()
        _train(model, torch.optim.SGD(model.parameters(), lr=0.01), 1, torch.Generator().manual_seed(0))
        telemetry.end_epoch()
    assert not [r for r in caplog.records if "not inside the model" in r.getMessage()]
    telemetry.close()
