"""The controller code of docs/tamiyo.md ("A lifecycle gate", "Esper's gradient fields"), run as written against real
training."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch

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
