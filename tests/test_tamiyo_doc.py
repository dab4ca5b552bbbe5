"""The controller code of docs/tamiyo.md ("A lifecycle gate", "Esper's gradient fields"), run as written against real
training."""

from __future__ import annotations

import enum
import math
import re
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tolaria_otel import SeedLayerSettings

from .helpers import seeded_network, telemetry_for

DOC = Path(__file__).resolve().parents[1] / "docs" / "tamiyo.md"


def gate_code() -> str:
    section = DOC.read_text(encoding="utf-8").split("## A lifecycle gate", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_the_documented_gate_holds_an_erratic_seed_and_one_off_the_ratio_band(capsys):
    model, registry = seeded_network(3)
    telemetry, _ = telemetry_for(model, registry, SeedLayerSettings(enabled=True, host_norm=True))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    telemetry.attach(optimizer)
    generator = torch.Generator().manual_seed(0)
    for step in range(20):
        model(torch.randn(16, 32, generator=generator)).pow(2).mean().backward()
        if step == 7:  # one step carries most of seed-2's epoch
            for p in registry.modules["seed-2"].parameters():
                p.grad.mul_(50.0)
        for p in registry.modules["seed-1"].parameters():  # steady, but far stronger than the host
            p.grad.mul_(1000.0)
        optimizer.step()
        optimizer.zero_grad()
    namespace = {"telemetry": telemetry}
    exec(compile(gate_code(), str(DOC), "exec"), namespace)  # the documented code itself
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("seed-0 [TRAINING]: advance: steady")
    assert lines[1].startswith("seed-1 [TRAINING]: hold: ratio to the host")
    assert lines[2].startswith("seed-2 [TRAINING]: hold: erratic gradient")


def esper_code() -> str:
    section = DOC.read_text(encoding="utf-8").split("## Esper's gradient fields", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_the_documented_esper_fields_equal_esper_s_formula_on_float64_counts(capsys):
    """Esper's four fields from the summary, as the doc computes them, against the formula applied to
    counts taken in float64 from every gradient tensor at every step."""
    model, registry = seeded_network(4)
    telemetry, _ = telemetry_for(model, registry, SeedLayerSettings(enabled=True))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the weights stay: the scaled seeds stay so
    scales = {"seed-0": 1.0, "seed-1": 1e5, "seed-2": 1e-8, "seed-3": 1.0}
    counts = {seed_id: [0, 0, 0] for seed_id in scales}  # tensor-steps, below 1e-7, above 10 or non-finite
    generator = torch.Generator().manual_seed(0)
    for step in range(12):
        model(torch.randn(16, 32, generator=generator)).pow(2).mean().backward()
        for seed_id, module in registry.modules.items():
            for p in module.parameters():
                p.grad.mul_(scales[seed_id])
                if seed_id == "seed-3" and step == 5:
                    p.grad.fill_(float("inf"))
                norm = float(torch.linalg.vector_norm(p.grad.double()))
                counts[seed_id][0] += 1
                counts[seed_id][1] += norm < 1e-7
                counts[seed_id][2] += not norm <= 10.0
        telemetry.observe_step()
        optimizer.zero_grad()
    namespace: dict[str, Any] = {"telemetry": telemetry}  # and what the documented code defines
    exec(compile(esper_code(), str(DOC), "exec"), namespace)  # the documented code itself
    assert len(capsys.readouterr().out.splitlines()) == 4
    summary = namespace["summary"]
    for seed_id, (tensor_steps, below, above) in counts.items():
        fields = namespace["esper_gradient_fields"](summary.seeds[seed_id])
        health = (
            0.0
            if seed_id == "seed-3"
            else min(max(1 - 0.5 * below / tensor_steps - 0.8 * above / tensor_steps, 0.0), 1.0)
        )
        assert fields["gradient_health"] == pytest.approx(health, abs=1e-12), seed_id
        assert (fields["has_vanishing"], fields["has_exploding"]) == (below > 0, above > 0), seed_id
    assert namespace["esper_gradient_fields"](summary.seeds["seed-1"])["has_exploding"]
    assert namespace["esper_gradient_fields"](summary.seeds["seed-2"])["has_vanishing"]
    assert 0.0 < namespace["esper_gradient_fields"](summary.seeds["seed-0"])["gradient_health"] <= 1.0


def python_block_with(text: str) -> str:
    """The documented Python block that contains ``text``."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.DOTALL)
    (block,) = [block for block in blocks if text in block]
    return block


class SeedStage(enum.IntEnum):
    """Esper's stages today (leyline/stages.py): an IntEnum, no prefix."""

    UNKNOWN = 0
    DORMANT = 1
    GERMINATED = 2
    TRAINING = 3
    BLENDING = 4
    HOLDING = 6
    FOSSILIZED = 7
    PRUNED = 8
    EMBARGOED = 9
    RESETTING = 10


class SeedSlot(nn.Module):
    """Esper's slot: the seed and its blending gate, with a state (None while the slot is empty)."""

    def __init__(self, stage: SeedStage | None, width: int = 32) -> None:
        super().__init__()
        self.seed = nn.Sequential(nn.Linear(width, 16), nn.Tanh(), nn.Linear(16, width))
        self.alpha_schedule = nn.Linear(width, 1)
        self.state = None if stage is None else types.SimpleNamespace(stage=stage, seed_id=f"ep0_env0_seed_{id(self)}")

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.state is None or self.state.stage == SeedStage.GERMINATED:  # outside the graph
            return h
        return h + torch.sigmoid(self.alpha_schedule(h)) * self.seed(h)


class EsperShapedModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(32, 32)
        self.head = nn.Linear(32, 10)
        self.seed_slots = nn.ModuleDict(
            {
                "r0c0": SeedSlot(SeedStage.TRAINING),
                "r0c1": SeedSlot(SeedStage.BLENDING),
                "r0c2": SeedSlot(SeedStage.GERMINATED),
                "r1c0": SeedSlot(None),
            }
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for slot in self.seed_slots.values():
            h = slot(h)
        return self.head(h)


def test_the_documented_esper_slots_source_and_clip_reading_on_esper_s_per_slot_clips() -> None:
    """Esper's shape: SeedSlot modules with IntEnum stages, the host clipped and then every slot with a state
    apart at 1.0 (the GERMINATED one too, without gradient); one slot explodes. The documented seed source
    reads Esper's names, and the documented clip reading gives each slot its own clip's facts, checked
    against torch's factor computed in float64 from the pre-clip gradients."""
    torch.manual_seed(0)
    model = EsperShapedModel()
    host = [*model.stem.parameters(), *model.head.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-9)
    namespace: dict[str, Any] = {"model": model, "host_optimizer": optimizer}
    exec(compile(python_block_with("def esper_slots"), str(DOC), "exec"), namespace)
    exec(compile(python_block_with("def clip_covering"), str(DOC), "exec"), namespace)
    telemetry = namespace["telemetry"]
    slots = {slot_id: slot for slot_id, slot in model.seed_slots.items() if slot.state is not None}
    factors: dict[str, list[float]] = {name: [] for name in ("host", *slots)}
    try:
        for _ in range(4):
            model(torch.randn(8, 32)).square().mean().backward()
            for p in model.seed_slots["r0c1"].parameters():
                if p.grad is not None:
                    p.grad.mul_(1e4)  # the blending slot explodes
            for name, params in (
                ("host", host),
                *((slot_id, list(slot.parameters())) for slot_id, slot in slots.items()),
            ):
                grads = [p.grad.double() for p in params if p.grad is not None]
                if grads:
                    total = math.sqrt(sum(float(g.square().sum()) for g in grads))
                    factors[name].append(min(1.0 / (total + 1e-6), 1.0))
                torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad()
        summary = telemetry.end_epoch()
    finally:
        telemetry.close()
    assert {seed_id: seed.stage for seed_id, seed in summary.seeds.items()} == {
        "r0c0": "TRAINING",
        "r0c1": "BLENDING",
        "r0c2": "GERMINATED",
    }
    clip_covering = namespace["clip_covering"]
    for slot_id in ("r0c0", "r0c1"):
        clipped, smallest = clip_covering(summary, summary.seeds[slot_id])
        assert clipped == sum(f < 1 for f in factors[slot_id]) and smallest == pytest.approx(
            min(factors[slot_id]), rel=1e-5
        )
    assert clip_covering(summary, summary.seeds["r0c1"])[0] == 4
    assert clip_covering(summary, summary.seeds["r0c0"])[0] == 0  # the exploding slot's clip is not its
    assert summary.seeds["r0c2"].min_clip_factor is None  # GERMINATED: no gradient, no clip of its own
    assert summary.min_clip_factor == pytest.approx(min(factors["host"]), rel=1e-5)  # the host's clip alone
