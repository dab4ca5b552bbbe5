"""The controller rule of docs/tamiyo.md ("A lifecycle gate"), run as written against real training."""

from __future__ import annotations

import re
from pathlib import Path

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
    exec(compile(gate_code(), str(DOC), "exec"), namespace)  # noqa: S102 - the documented code itself
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("seed-0 [TRAINING]: advance: steady")
    assert lines[1].startswith("seed-1 [TRAINING]: hold: ratio to the host")
    assert lines[2].startswith("seed-2 [TRAINING]: hold: erratic gradient")
