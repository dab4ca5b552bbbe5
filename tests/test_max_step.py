"""Issue 24.4: ``SeedSummary.max_step`` and ``layer_max_step``, the optimizer step of each largest per-step norm,
against the argmax of float64 per-step squares taken from the gradients themselves."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

from tolaria_otel import EpochSummary, SeedLayerSettings, SeedLayerTelemetry

from .helpers import telemetry_for

TOTAL = ""


class Net(nn.Module):
    """A host layer and seeds added to its output; ``active`` are the seeds the source lists."""

    def __init__(self, seed_ids: tuple[str, ...]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.host = nn.Linear(8, 8)
        self.seeds = nn.ModuleDict({s: nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4)) for s in seed_ids})
        self.head = nn.Linear(8, 4)
        self.active: list[str] = list(seed_ids)

    def source(self) -> dict[str, tuple[nn.Module, str]]:
        return {s: (self.seeds[s], "TRAINING") for s in self.active}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.host(x)
        return self.head(h) + sum((self.seeds[s](h) for s in self.active), torch.zeros(()))


def squares(net: Net) -> dict[str, dict[str, float]]:
    """Per listed seed, per layer and total (``TOTAL``), the float64 squared gradient norm of this step."""
    out: dict[str, dict[str, float]] = {}
    for seed_id, (module, _) in net.source().items():
        layers = {
            name: sum(float(p.grad.double().square().sum()) for p in sub.parameters(recurse=False))
            for name, sub in module.named_modules()
            if list(sub.parameters(recurse=False))
        }
        layers[TOTAL] = math.fsum(float(p.grad.double().square().sum()) for p in module.parameters())
        out[seed_id] = layers
    return out


def first_largest(steps: list[tuple[int, float]]) -> int:
    """The reference's step of the largest value: non-finite ranks first, the first on ties."""
    keyed = [(math.inf if not math.isfinite(v) else v, -i, number) for i, (number, v) in enumerate(steps)]
    return max(keyed)[2]


def train(
    net: Net,
    telemetry: SeedLayerTelemetry,
    steps: int,
    *,
    every: int = 1,
    scale: Callable[[int], float] = lambda step: 1.0,
    numbers: Callable[[int], int] | None = None,
    before: Callable[[int], None] = lambda step: None,
) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """``steps`` optimizer steps; per seed and layer, the reference's (step number, square) of each sampled step."""
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(1)
    reference: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for step in range(steps):
        before(step)
        x = torch.randn(16, 8, generator=generator)
        loss = nn.functional.mse_loss(net(x), torch.zeros(16, 4)) * scale(step)
        loss.backward()
        number = step if numbers is None else numbers(step)
        if step % every == 0:
            for seed_id, layers in squares(net).items():
                for layer, value in layers.items():
                    reference.setdefault(seed_id, {}).setdefault(layer, []).append((number, value))
        if numbers is None:
            telemetry.observe_step()
        else:
            telemetry.observe_step(step=number)
        optimizer.step()
        optimizer.zero_grad()
    return reference


def check(summary, reference) -> None:
    assert set(summary.seeds) == set(reference)
    for seed_id, layers in reference.items():
        seed = summary.seeds[seed_id]
        assert seed.max_step == first_largest(layers[TOTAL])
        assert seed.max_norm == pytest.approx(math.sqrt(max(v for _, v in layers[TOTAL])), rel=1e-5)
        assert seed.layer_max_step == {layer: first_largest(v) for layer, v in layers.items() if layer != TOTAL}


@pytest.mark.parametrize("every", [1, 3])
def test_max_step_is_the_reference_s_argmax_with_a_planted_spike(every):
    net = Net(("a", "b"))
    telemetry = telemetry_for(net, net.source, SeedLayerSettings(enabled=True, sample_every=every))[0]
    spike = 3 * 41  # sampled whatever ``every``; past the first FLUSH_EVERY batch of steps
    reference = train(net, telemetry, 200, every=every, scale=lambda step: 30.0 if step == spike else 1.0)
    summary = telemetry.end_epoch()
    check(summary, reference)
    assert summary.seeds["a"].max_step == summary.seeds["b"].max_step == spike
    # The next epoch goes on counting: its steps are numbered 200 on.
    train(net, telemetry, 70, every=every, scale=lambda step: 30.0 if step == 67 else 1.0)
    summary = telemetry.end_epoch()
    assert summary.seeds["a"].max_step == 200 + 67  # sampled: 267 = 3 x 89
    assert telemetry.failures == 0


def test_a_loop_s_own_step_numbers():
    net = Net(("a",))
    telemetry = telemetry_for(net, net.source, SeedLayerSettings(enabled=True, sample_every=2))[0]
    numbers = [1000 + 10 * step + (7 if step > 100 else 0) for step in range(150)]  # a jump: not a rule
    reference = train(
        net, telemetry, 150, every=2, scale=lambda s: 9.0 if s == 120 else 1.0, numbers=numbers.__getitem__
    )
    summary = telemetry.end_epoch()
    check(summary, reference)
    assert summary.seeds["a"].max_step == numbers[120]


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3"])
def test_a_bad_step_is_logged_and_counted_over(bad, caplog):
    net = Net(("a",))
    telemetry = telemetry_for(net, net.source, SeedLayerSettings(enabled=True))[0]
    with caplog.at_level(logging.WARNING, logger="tolaria_otel.telemetry"):
        net(torch.ones(2, 8)).sum().backward()
        telemetry.observe_step(step=bad)
    assert telemetry.failures == 1
    assert "observe_step(step=...)" in caplog.text
    assert telemetry.end_epoch().seeds["a"].max_step == 0


def test_a_nan_step_is_the_largest_and_the_first_non_finite_one_wins():
    net = Net(("a",))
    telemetry = telemetry_for(net, net.source, SeedLayerSettings(enabled=True))[0]
    planted = {30: math.inf, 90: math.nan}

    def scale(step: int) -> float:
        return planted.get(step, 100.0 if step == 120 else 1.0)  # a larger finite spike later loses

    reference = train(net, telemetry, 140, scale=scale)
    summary = telemetry.end_epoch()
    assert first_largest(reference["a"][TOTAL]) == 30
    seed = summary.seeds["a"]
    assert seed.max_step == 30
    assert seed.max_norm is not None and not math.isfinite(seed.max_norm)


def test_segments_of_an_epoch_a_seed_germinated_and_culled_mid_epoch():
    """Seeds come and go: each segment's largest step is its own batch's, combined by value, then the earlier."""
    net = Net(("a", "b", "c"))
    net.active = ["a"]
    telemetry = telemetry_for(net, net.source, SeedLayerSettings(enabled=True))[0]

    def before(step: int) -> None:
        net.active = ["a"] if step < 50 or 110 <= step < 130 else ["a", "b"] if step < 110 else ["a", "c"]

    spikes = {20: 5.0, 100: 5.0, 115: 20.0, 140: 3.0}  # "a": 115 in its third run of segments
    reference = train(net, telemetry, 160, scale=lambda s: spikes.get(s, 1.0), before=before)
    summary = telemetry.end_epoch()
    check(summary, reference)
    assert summary.seeds["a"].max_step == 115
    assert summary.seeds["b"].max_step == 100
    assert summary.seeds["c"].max_step == 140


def test_a_tie_is_the_first_step():
    net = Net(("a",))
    telemetry = telemetry_for(net, net.source, SeedLayerSettings(enabled=True))[0]
    for p in net.parameters():
        p.requires_grad_(False)
    for p in net.seeds["a"].parameters():
        p.requires_grad_(True)
    for step in range(100):  # the same gradient at every step but two equal larger ones
        for p in net.seeds["a"].parameters():
            p.grad = torch.full_like(p, 2.0 if step in (70, 80) else 1.0)
        telemetry.observe_step()
    summary = telemetry.end_epoch()
    assert summary.seeds["a"].max_step == 70
    assert set(summary.seeds["a"].layer_max_step.values()) == {70}


def test_json_round_trip_keeps_the_steps():
    net = Net(("a",))
    telemetry = telemetry_for(net, net.source, SeedLayerSettings(enabled=True))[0]
    train(net, telemetry, 10, scale=lambda s: 4.0 if s == 6 else 1.0)
    summary = telemetry.end_epoch()
    data = summary.to_dict()
    assert data["seeds"][0]["max_step"] == 6
    assert all(layer["max_step"] == 6 for layer in data["seeds"][0]["top_layers"])
    assert EpochSummary.from_dict(data) == summary
