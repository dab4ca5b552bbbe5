"""Esper's gradient-health inputs (issue 17.9): per seed, the tensor-steps whose gradient norm was below
the vanishing threshold or above the exploding one (or non-finite), counted on the device over the
epoch's sampled steps, against a float64 reference computed from each gradient tensor at each step."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping

import pytest
import torch
from torch import nn

from tolaria_otel import SeedLayerSettings, SeedSummary
from tolaria_otel.config.settings import SettingsError
from tolaria_otel.measure.step_norms import FLUSH_EVERY, LIST_TENSORS_MAX

from .helpers import telemetry_for

#: Gradient scales per seed: a steady one, one far above the exploding threshold, one far below the
#: vanishing one, and one that straddles the exploding threshold (some of its tensors above, some not).
SCALES = {"calm": 1.0, "exploding": 1e4, "vanishing": 1e-9, "mixed": 60.0}


class TensorReference:
    """Per seed, from the gradients themselves in float64: tensors that had a gradient, tensor-steps below
    ``lower`` and above ``upper`` (or non-finite), and every norm seen (to keep clear of the thresholds)."""

    def __init__(self, seeds: Mapping[str, nn.Module], lower: float, upper: float) -> None:
        self.seeds, self.lower, self.upper = seeds, lower, upper
        self.below: Counter[str] = Counter()
        self.above: Counter[str] = Counter()
        self.had: dict[str, set[int]] = {seed_id: set() for seed_id in seeds}
        self.norms: list[float] = []

    def step(self) -> None:
        for seed_id, module in self.seeds.items():
            for param in module.parameters():
                if param.grad is None:
                    continue
                self.had[seed_id].add(id(param))
                norm = float(torch.linalg.vector_norm(param.grad.double()))
                self.norms.append(norm)
                self.below[seed_id] += norm < self.lower
                self.above[seed_id] += not norm <= self.upper  # NaN and Inf count, as in Esper


def _run(
    seed_layers: int, settings: SeedLayerSettings, steps: int
) -> tuple[Mapping[str, SeedSummary], TensorReference]:
    torch.manual_seed(0)
    seeds = {seed_id: nn.Sequential(*(nn.Linear(6, 6) for _ in range(seed_layers))) for seed_id in SCALES}
    model = nn.ModuleDict(seeds)
    telemetry, _ = telemetry_for(model, {s: (m, "TRAINING") for s, m in seeds.items()}, settings)
    reference = TensorReference(seeds, settings.tensor_vanishing_below, settings.tensor_exploding_above)
    generator = torch.Generator().manual_seed(1)
    for step in range(steps):
        x = torch.randn(8, 6, generator=generator)
        sum(module(x).square().mean() for module in seeds.values()).backward()
        for seed_id, module in seeds.items():
            for param in module.parameters():
                param.grad.mul_(SCALES[seed_id])
        if step % 5 == 2:  # a missing gradient is not a vanishing one
            seeds["vanishing"][0].bias.grad = None
            seeds["calm"][-1].weight.grad = None
        if step == 3:  # a non-finite gradient counts as exploding
            grad = seeds["mixed"].get_parameter("0.weight").grad
            assert grad is not None
            grad[0, 0] = float("nan")
        reference.step()
        telemetry.observe_step()
        model.zero_grad()
    summary = telemetry.end_epoch()
    return summary.seeds, reference


@pytest.mark.parametrize("seed_layers", [2, 12])  # 16 and 96 gradient tensors: norms kept as they are, or buffered
@pytest.mark.parametrize("bounds", [(1e-7, 10.0), (1e-3, 0.5)])
def test_tensor_steps_below_and_above_the_thresholds_equal_a_float64_count(seed_layers, bounds):
    assert (len(SCALES) * 2 * seed_layers > LIST_TENSORS_MAX) == (seed_layers == 12)
    lower, upper = bounds
    settings = SeedLayerSettings(enabled=True, tensor_vanishing_below=lower, tensor_exploding_above=upper)
    steps = FLUSH_EVERY + 9  # a flush, then a partial batch at the epoch end
    seeds, reference = _run(seed_layers, settings, steps)
    # float32 norms against float64 ones: no norm may sit where the rounding could decide.
    assert all(not math.isfinite(n) or not math.isclose(n, b, rel_tol=1e-4) for n in reference.norms for b in bounds)
    for seed_id in SCALES:
        seed = seeds[seed_id]
        assert seed.gradient_tensors == len(reference.had[seed_id]) == 2 * seed_layers
        assert (seed.vanishing_tensor_steps, seed.exploding_tensor_steps) == (
            reference.below[seed_id],
            reference.above[seed_id],
        ), seed_id
    if bounds == (1e-7, 10.0):  # the defaults: the fixture gives each case something to count
        assert seeds["exploding"].exploding_tensor_steps == steps * 2 * seed_layers
        vanishing, mixed = seeds["vanishing"].vanishing_tensor_steps, seeds["mixed"].exploding_tensor_steps
        assert vanishing is not None and vanishing > 0 and seeds["calm"].vanishing_tensor_steps == 0
        assert mixed is not None and 0 < mixed < steps * 2 * seed_layers


def test_the_summary_dict_carries_the_counts():
    from tolaria_otel.summary.epoch_summary import EpochSummary

    seeds, _ = _run(2, SeedLayerSettings(enabled=True), 3)
    record = EpochSummary(0, 3, 3, seeds).to_dict()["seeds"]
    by_id = {seed["seed_id"]: seed for seed in record}
    assert by_id["exploding"]["exploding_tensor_steps"] == 12
    assert by_id["exploding"]["gradient_tensors"] == 4
    assert by_id["calm"]["vanishing_tensor_steps"] == 0


def test_thresholds_from_the_environment_and_their_errors():
    env = {"TOLARIA_SEED_TENSOR_VANISHING_BELOW": "1e-6", "TOLARIA_SEED_TENSOR_EXPLODING_ABOVE": " 100 "}
    settings = SeedLayerSettings.from_env(env)
    assert (settings.tensor_vanishing_below, settings.tensor_exploding_above) == (1e-6, 100.0)
    assert SeedLayerSettings.from_env({}).tensor_vanishing_below == 1e-7
    below, above = "TOLARIA_SEED_TENSOR_VANISHING_BELOW", "TOLARIA_SEED_TENSOR_EXPLODING_ABOVE"
    for name, value in [(below, "0"), (above, "-1"), (above, "nan"), (below, "tiny")]:
        with pytest.raises(SettingsError, match=rf"^{name}='{value}' is not valid: expected a finite number above 0"):
            SeedLayerSettings.from_env({name: value})
    with pytest.raises(
        SettingsError,
        match=re.escape(
            "TOLARIA_SEED_TENSOR_VANISHING_BELOW=20.0 is not below TOLARIA_SEED_TENSOR_EXPLODING_ABOVE=10.0"
        ),
    ):
        SeedLayerSettings.from_env({"TOLARIA_SEED_TENSOR_VANISHING_BELOW": "20"})
    with pytest.raises(
        SettingsError, match=re.escape("tensor_vanishing_below=1.0 is not below tensor_exploding_above=1.0")
    ):
        SeedLayerSettings(tensor_vanishing_below=1.0, tensor_exploding_above=1.0)
    with pytest.raises(SettingsError, match="tensor_exploding_above='10' is not valid"):
        SeedLayerSettings(tensor_exploding_above="10")  # type: ignore[arg-type]
