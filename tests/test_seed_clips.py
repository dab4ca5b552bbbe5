"""Clip facts per seed, in Esper's shape: the host clipped on its own, then each seed on its own, at 1.0.

The reference is torch's own factor per group, ``min(max_norm / (total + 1e-6), 1)``, computed here in
float64 from the gradients as they are just before the clips (copied, never the package's norms).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

from tolaria_otel import EpochSummary, SeedLayerSettings, SeedLayerTelemetry
from tolaria_otel.demo.seeded_mlp import SeededMLP

from .helpers import collect, metered, seeded_network
from .test_off_and_syncs import CountingMode

ON = SeedLayerSettings(enabled=True, top_k=3)
CLIP = 1.0
STEPS = 6


def groups_of(model: SeededMLP) -> dict[str, list[nn.Parameter]]:
    """Esper's clip groups: the host (every parameter outside the seeds), then each seed."""
    host = [param for name, param in model.named_parameters() if not name.startswith("seeds.")]
    seeds = {f"seed-{name.split('_')[1]}": list(seed.parameters()) for name, seed in model.seeds.items()}
    return {"host": host, **seeds}


def torch_factor(params: list[nn.Parameter], max_norm: float = CLIP) -> float:
    """torch's clip factor of one group, in float64 from its gradients as they are now."""
    total = math.sqrt(sum(float(p.grad.detach().double().square().sum()) for p in params if p.grad is not None))
    return min(max_norm / (total + 1e-6), 1.0)


class Facts:
    """Per group: its factor at every step (the float64 reference)."""

    def __init__(self) -> None:
        self.factors: dict[str, list[float]] = {}

    def add(self, group: str, factor: float) -> None:
        self.factors.setdefault(group, []).append(factor)

    def expect(self, group: str) -> tuple[int, int, float]:
        factors = self.factors[group]
        return len(factors), sum(f < 1 for f in factors), min(factors)


def run(
    scales: dict[str, float],
    clip: str = "per group",
    how: str = "attached",
    steps: int = STEPS,
    settings: SeedLayerSettings = ON,
) -> tuple[EpochSummary, Facts, SeedLayerTelemetry]:
    """Train the host and two seeds; ``scales`` multiplies a group's gradients before the clips (an
    explosion); ``clip``: "per group" (Esper's), or "global" (one clip over all parameters)."""
    model, registry = seeded_network(2)
    groups = groups_of(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-9)  # tiny steps: the gradients stay alike
    provider, _ = metered(settings)
    telemetry = SeedLayerTelemetry(model, registry, settings=settings, meter_provider=provider)
    clip_grad_norm_: Callable[..., object]
    if how == "attached":
        telemetry.attach(optimizer)
        clip_grad_norm_ = lambda params, max_norm: torch.nn.utils.clip_grad_norm_(params, max_norm)  # noqa: E731, PLW0108
    else:
        clip_grad_norm_ = telemetry.clip_grad_norm_
    facts = Facts()
    generator = torch.Generator().manual_seed(3)
    try:
        for _ in range(steps):
            x, y = torch.randn(16, 32, generator=generator), torch.randn(16, 10, generator=generator)
            (model(x) - y).square().mean().backward()
            for group, scale in scales.items():
                for p in groups[group]:
                    p.grad.mul_(scale)
            if clip == "global":
                facts.add("trainer", torch_factor(list(model.parameters())))
                clip_grad_norm_(model.parameters(), CLIP)
            else:
                for group, params in groups.items():
                    facts.add(group, torch_factor(params))
                    clip_grad_norm_(params, CLIP)
            optimizer.step()
            if how != "attached":
                telemetry.observe_step()
            optimizer.zero_grad()
        summary = telemetry.end_epoch()
    finally:
        telemetry.close()
    assert summary is not None
    return summary, facts, telemetry


CALM = {"seed-0": 1e-3, "seed-1": 1e-3}  # both seeds' own gradient norm well below the clip norm


def assert_seed_facts(summary: EpochSummary, seed_id: str, facts: Facts) -> None:
    seed = summary.seeds[seed_id]
    steps, clipped, smallest = facts.expect(seed_id)
    assert (seed.clip_steps, seed.clipped_steps) == (steps, clipped), seed_id
    assert seed.min_clip_factor == pytest.approx(smallest, rel=1e-5), seed_id


@pytest.mark.parametrize("how", ["attached", "telemetry.clip_grad_norm_"])
def test_the_host_exploding_is_the_trainers_fact_and_calm_seeds_stay_unclipped(how: str) -> None:
    summary, facts, _ = run({"host": 1e3, **CALM}, how=how)
    steps, clipped, smallest = facts.expect("host")
    assert steps == clipped == STEPS and smallest < 1e-2  # the reference: only the host's clip scaled
    assert (summary.clip_steps, summary.clipped_steps) == (STEPS, STEPS)
    assert summary.min_clip_factor == pytest.approx(smallest, rel=1e-5)
    for seed_id in ("seed-0", "seed-1"):
        assert facts.expect(seed_id)[1:] == (0, 1.0)
        assert_seed_facts(summary, seed_id, facts)
        assert summary.seeds[seed_id].clipped_steps == 0 and summary.seeds[seed_id].min_clip_factor == 1.0


@pytest.mark.parametrize("how", ["attached", "telemetry.clip_grad_norm_"])
def test_one_seed_exploding_shows_in_its_own_facts_only(how: str) -> None:
    summary, facts, _ = run({"host": 1e-3, "seed-0": 1e-3, "seed-1": 1e3}, how=how)
    assert facts.expect("seed-1")[1] == STEPS and facts.expect("seed-1")[2] < 0.1
    assert facts.expect("host")[1:] == (0, 1.0) and facts.expect("seed-0")[1:] == (0, 1.0)
    assert_seed_facts(summary, "seed-1", facts)
    assert_seed_facts(summary, "seed-0", facts)
    assert summary.seeds["seed-0"].clipped_steps == 0
    assert (summary.clip_steps, summary.clipped_steps, summary.min_clip_factor) == (STEPS, 0, 1.0)  # the host's
    assert (summary.seeds["seed-1"].total_norm or 0.0) > 1.0  # measured before its clip


def test_a_global_clip_is_the_trainers_fact_as_before() -> None:
    summary, facts, _ = run({"seed-1": 1e3}, clip="global")
    steps, clipped, smallest = facts.expect("trainer")
    assert (summary.clip_steps, summary.clipped_steps) == (steps, clipped) == (STEPS, STEPS)
    assert summary.min_clip_factor == pytest.approx(smallest, rel=1e-5)
    for seed in summary.seeds.values():
        assert (seed.clip_steps, seed.clipped_steps, seed.min_clip_factor) == (0, 0, None)


def test_a_clip_over_two_seeds_is_the_trainers() -> None:
    model, registry = seeded_network(2)
    groups = groups_of(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-9)
    telemetry = SeedLayerTelemetry(model, registry, settings=ON, meter_provider=metered(ON)[0])
    telemetry.attach(optimizer)
    factors = []
    try:
        for _ in range(3):
            model(torch.randn(8, 32)).square().mean().backward()
            both = groups["seed-0"] + groups["seed-1"]
            for p in both:
                p.grad.mul_(1e3)
            factors.append(torch_factor(both))
            torch.nn.utils.clip_grad_norm_(both, CLIP)
            optimizer.step()
            optimizer.zero_grad()
        summary = telemetry.end_epoch()
    finally:
        telemetry.close()
    assert summary is not None
    assert (summary.clip_steps, summary.clipped_steps) == (3, 3)
    assert summary.min_clip_factor == pytest.approx(min(factors), rel=1e-5)
    assert all(seed.min_clip_factor is None and seed.clip_steps == 0 for seed in summary.seeds.values())


def test_with_the_host_measured_the_hosts_clip_is_still_the_trainers() -> None:
    summary, facts, _ = run({"host": 1e3, **CALM}, settings=SeedLayerSettings(enabled=True, top_k=3, host_norm=True))
    assert summary.host_norm is not None
    assert summary.min_clip_factor == pytest.approx(facts.expect("host")[2], rel=1e-5)
    assert summary.clipped_steps == STEPS
    for seed_id in ("seed-0", "seed-1"):
        assert_seed_facts(summary, seed_id, facts)


def test_the_per_seed_facts_survive_the_json_form() -> None:
    summary, _, _ = run({"seed-1": 1e3})
    again = EpochSummary.from_dict(summary.to_dict())
    assert again == summary
    assert again.seeds["seed-1"].clipped_steps == STEPS
    assert "clipped 6/6" in str(summary)


def test_per_group_clipping_adds_no_op_per_step_and_one_host_copy_per_epoch() -> None:
    """Esper's three clips a step: no host read on the step path, no op per step beyond the clips' own
    (the factors wait and are folded every FLUSH_EVERY steps), one host copy of every owner's facts."""
    steps = 128

    def train(model: SeededMLP, optimizer: torch.optim.Optimizer, clip: Callable[..., object], commit=None) -> None:
        groups = list(groups_of(model).values())
        generator = torch.Generator().manual_seed(0)
        for _ in range(steps):
            model(torch.randn(8, 32, generator=generator)).square().mean().backward()
            for group in groups:
                clip(group, CLIP)
            optimizer.step()
            if commit is not None:
                commit()
            optimizer.zero_grad()

    model, registry = seeded_network(2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    telemetry = SeedLayerTelemetry(model, registry, settings=ON, meter_provider=metered(ON)[0])
    with CountingMode() as measured:
        train(model, optimizer, telemetry.clip_grad_norm_, telemetry.observe_step)
    with CountingMode() as clip_alone:
        train(model, optimizer, torch.nn.utils.clip_grad.clip_grad_norm_)
    with CountingMode() as epoch_end:
        summary = telemetry.end_epoch()
    telemetry.close()
    assert measured.host_transfers == 0
    assert len(measured.ops) - len(clip_alone.ops) < steps
    assert epoch_end.host_transfers <= 2  # the statistics, and every owner's clip facts in one copy
    assert summary is not None and summary.clip_steps == steps
    assert all(seed.clip_steps == steps for seed in summary.seeds.values())


def test_seed_clip_facts_are_exported_per_seed() -> None:
    from tolaria_otel.export.instruments import MIN_CLIP_FACTOR, SEED_CLIPPED_STEPS, SEED_MIN_CLIP_FACTOR

    model, registry = seeded_network(2)
    groups = groups_of(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-9)
    provider, reader = metered(ON)
    telemetry = SeedLayerTelemetry(model, registry, settings=ON, meter_provider=provider, attributes={"env_id": "7"})
    telemetry.attach(optimizer)
    try:
        for _ in range(2):
            model(torch.randn(8, 32)).square().mean().backward()
            for p in groups["seed-1"]:
                p.grad.mul_(1e3)
            for name in ("host", "seed-1"):  # seed-0 is not clipped: no facts of its own, no points
                torch.nn.utils.clip_grad_norm_(groups[name], CLIP)
            optimizer.step()
            optimizer.zero_grad()
        summary = telemetry.end_epoch()
        exported = collect(reader)
    finally:
        telemetry.close()
    assert summary is not None
    stage = summary.seeds["seed-1"].stage
    assert exported[SEED_CLIPPED_STEPS] == [({"env_id": "7", "seed_id": "seed-1", "stage": stage}, 2, "")]
    ((attributes, value, _),) = exported[SEED_MIN_CLIP_FACTOR]
    assert attributes == {"env_id": "7", "seed_id": "seed-1", "stage": stage}
    assert value == pytest.approx(summary.seeds["seed-1"].min_clip_factor) and value < 1.0
    ((attributes, value, _),) = exported[MIN_CLIP_FACTOR]
    assert attributes == {"env_id": "7"} and value == pytest.approx(summary.min_clip_factor)
    from tolaria_otel.export.volume import trainer_series

    series = trainer_series(ON, 2, 3, clip=True, seed_clips=1)  # what the store holds: volume's count
    assert series["tolaria_grad_agg_seed_clip_clipped_steps"] == len(exported[SEED_CLIPPED_STEPS]) == 1
    assert series["tolaria_grad_agg_seed_clip_min_factor"] == len(exported[SEED_MIN_CLIP_FACTOR]) == 1
    assert series["tolaria_grad_agg_clip_min_factor"] == len(exported[MIN_CLIP_FACTOR]) == 1


def test_a_germinated_seed_without_gradient_has_no_clip_facts() -> None:
    """Esper clips a GERMINATED seed too (outside the graph, no gradient): that clip scales nothing, and
    the seed has no clip facts of its own."""
    model, registry = seeded_network(1)
    germinated = model.graft("seed_1")
    germinated.in_graph = False
    registry.add("seed-1", germinated, "GERMINATED")
    groups = groups_of(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-9)
    telemetry = SeedLayerTelemetry(model, registry, settings=ON, meter_provider=metered(ON)[0])
    telemetry.attach(optimizer)
    try:
        for _ in range(2):
            model(torch.randn(8, 32)).square().mean().backward()
            for params in groups.values():
                torch.nn.utils.clip_grad_norm_(params, CLIP)
            optimizer.step()
            optimizer.zero_grad()
        summary = telemetry.end_epoch()
    finally:
        telemetry.close()
    assert summary is not None
    assert summary.seeds["seed-1"].min_clip_factor is None and summary.seeds["seed-1"].clip_steps == 0
    assert summary.seeds["seed-0"].clip_steps == 2 and summary.clip_steps == 2
