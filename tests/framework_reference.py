"""Independent references for the framework tests: the gradients an SGD step actually applied, and the
gradients backprop produced before any clip (what the package measures).

For plain SGD (no momentum, no weight decay) a step is ``p -= lr * g``, so ``(p_before - p_after) / lr``
is the gradient the optimizer applied: after accumulation, AMP unscaling and clipping, whatever the
framework did in between. The reference snapshots the parameters in a step pre-hook (a closure does
not move them) and differences them in a post-hook, in float64, for the seeds the source lists at that
step; it never reads ``.grad``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping

import pytest
import torch
from torch import nn

from tolaria_otel import EpochSummary

TOTAL = ""  # a seed's total among its per-step layer squares (no layer is named "")


class AppliedGradients:
    def __init__(self, optimizer: torch.optim.Optimizer, seeds: Callable[[], Mapping[str, tuple[nn.Module, object]]]):
        assert isinstance(optimizer, torch.optim.SGD), "the reference needs plain SGD"
        for group in optimizer.param_groups:
            assert group["momentum"] == 0 and group["weight_decay"] == 0
        self.seeds = seeds
        self._before: dict[int, torch.Tensor] = {}
        self._lr: dict[int, float] = {}
        self.step_totals: list[float] = []  # the whole model's applied gradient norm per step
        self.reset()
        optimizer.register_step_pre_hook(self._pre)
        optimizer.register_step_post_hook(self._post)

    def reset(self) -> None:
        self.squares: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.totals: dict[str, float] = defaultdict(float)
        self.steps: dict[str, int] = defaultdict(int)

    def _pre(self, optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        self._before = {id(p): p.detach().double().clone() for group in optimizer.param_groups for p in group["params"]}
        self._lr = {id(p): float(group["lr"]) for group in optimizer.param_groups for p in group["params"]}

    def _applied(self, p: torch.Tensor) -> torch.Tensor:
        return (self._before[id(p)] - p.detach().double()) / self._lr[id(p)]

    def _post(self, optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        self.step_totals.append(
            math.sqrt(
                sum(float(self._applied(p).square().sum()) for group in optimizer.param_groups for p in group["params"])
            )
        )
        for seed_id, (module, _) in self.seeds().items():
            self.steps[seed_id] += 1
            for name, sub in module.named_modules():
                params = [p for p in sub.parameters(recurse=False) if p.requires_grad]
                if params:
                    self.squares[seed_id][name or "(root)"] += sum(
                        float(self._applied(p).square().sum()) for p in params
                    )
            self.totals[seed_id] += sum(float(self._applied(p).square().sum()) for p in module.parameters())

    def epoch(self) -> tuple[dict[str, dict[str, float]], dict[str, float], dict[str, int]]:
        """(seed -> layer -> RMS, seed -> total RMS, seed -> steps) since the last call."""
        layers = {s: {layer: math.sqrt(v / self.steps[s]) for layer, v in d.items()} for s, d in self.squares.items()}
        totals = {s: math.sqrt(v / self.steps[s]) for s, v in self.totals.items()}
        steps = dict(self.steps)
        self.reset()
        return layers, totals, steps


class PreClipGradients:
    """The gradients as backprop left them, before any clip, in float64: what the package must measure.

    Each parameter's gradient is copied by a post-accumulate-grad hook, so the copy of the last backward
    before a step is the accumulated gradient; the optimizer's step post-hook (after any clip, and after a
    closure's backward: Lightning runs the last one inside ``step``) reads the copies, never ``.grad``. Per step
    it also keeps the clip factor torch's clip would apply,
    ``min(max_norm / (total + 1e-6), 1)`` over all the optimizer's parameters, and every seed's and layer's
    square under the step's number: the count of optimizer steps this reference saw before it, from 0 (with
    the reference created before the run's first step, the framework's 0-based global step, counted here and
    not read from the framework). Gradients must be float32 or wider with no loss scaling (an unscale would
    come after the copy).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        seeds: Callable[[], Mapping[str, tuple[nn.Module, object]]],
        max_norm: float,
    ) -> None:
        self.seeds = seeds
        self.max_norm = max_norm
        self._grads: dict[int, torch.Tensor] = {}
        self.factors: list[float] = []  # the clip factor of every step
        self.step_number = 0  # the next step's number: the steps seen so far
        #: Per epoch ended by :meth:`epoch`: seed -> layer (``TOTAL`` the seed's total) -> [(step number, square)].
        self.epoch_step_squares: list[dict[str, dict[str, list[tuple[int, float]]]]] = []
        self.handles = [p.register_post_accumulate_grad_hook(self._copy) for p in model.parameters() if p.requires_grad]
        self.reset()
        optimizer.register_step_post_hook(self._post)

    def _copy(self, param: torch.Tensor) -> None:
        self._grads[id(param)] = param.grad.detach().double().clone()

    def reset(self) -> None:
        self.squares: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.totals: dict[str, float] = defaultdict(float)
        self.maxima: dict[str, float] = defaultdict(float)
        self.steps: dict[str, int] = defaultdict(int)
        self.epoch_factors: list[float] = []
        self.step_squares: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))

    def _square(self, params: Iterable[torch.Tensor]) -> float:
        return sum(float(self._grads[id(p)].square().sum()) for p in params if id(p) in self._grads)

    def _post(self, optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        total = math.sqrt(self._square(p for group in optimizer.param_groups for p in group["params"]))
        factor = min(self.max_norm / (total + 1e-6), 1.0)
        self.factors.append(factor)
        self.epoch_factors.append(factor)
        for seed_id, (module, _) in self.seeds().items():
            self.steps[seed_id] += 1
            for name, sub in module.named_modules():
                params = [p for p in sub.parameters(recurse=False) if p.requires_grad]
                if params:
                    layer_square = self._square(params)
                    self.squares[seed_id][name or "(root)"] += layer_square
                    self.step_squares[seed_id][name or "(root)"].append((self.step_number, layer_square))
            square = self._square(module.parameters())
            self.totals[seed_id] += square
            self.maxima[seed_id] = max(self.maxima[seed_id], square)
            self.step_squares[seed_id][TOTAL].append((self.step_number, square))
        self.step_number += 1
        self._grads = {}

    def epoch(self) -> tuple[dict[str, dict[str, float]], dict[str, float], dict[str, int], list[float]]:
        """(seed -> layer -> RMS, seed -> total RMS, seed -> steps, clip factors per step) since the last call."""
        layers = {s: {layer: math.sqrt(v / self.steps[s]) for layer, v in d.items()} for s, d in self.squares.items()}
        totals = {s: math.sqrt(v / self.steps[s]) for s, v in self.totals.items()}
        steps = dict(self.steps)
        factors = list(self.epoch_factors)
        self.epoch_step_squares.append({s: dict(d) for s, d in self.step_squares.items()})
        self.reset()
        return layers, totals, steps, factors


def first_largest(steps: list[tuple[int, float]], margin: float = 1e-3) -> int:
    """The step number of the largest square (a non-finite one ranks largest, the first on ties), asserting
    that every other finite step is equal (a tie: the same gradient, zero say) or smaller by ``margin``
    (relative): an argmax float32 rounding cannot move."""
    keyed = [(math.inf if not math.isfinite(v) else v, -i, number) for i, (number, v) in enumerate(steps)]
    largest = max(keyed)
    if math.isfinite(largest[0]):
        assert all(v == largest[0] or v < largest[0] * (1 - margin) for v, _, _ in keyed), (
            f"no clear largest step: {steps}"
        )
    return largest[2]


def reference_max_steps(
    step_squares: Mapping[str, Mapping[str, list[tuple[int, float]]]],
) -> dict[str, tuple[int, dict[str, int]]]:
    """seed -> (its ``max_step``, layer -> ``layer_max_step``), from one epoch of per-step squares."""
    return {
        seed_id: (
            first_largest(list(layers[TOTAL])),
            {layer: first_largest(list(v)) for layer, v in layers.items() if layer != TOTAL},
        )
        for seed_id, layers in step_squares.items()
    }


def assert_max_steps(summary: EpochSummary, step_squares: Mapping[str, Mapping[str, list[tuple[int, float]]]]) -> None:
    """Every seed's ``max_step`` and ``layer_max_step`` (all its layers) are the reference's."""
    want = reference_max_steps(step_squares)
    assert set(summary.seeds) == set(want)
    got = {seed_id: (seed.max_step, dict(seed.layer_max_step)) for seed_id, seed in summary.seeds.items()}
    assert got == want


def assert_exploding_seed_epoch(
    summary: EpochSummary, layers: Mapping[str, Mapping[str, float]], totals: Mapping[str, float], factors: list[float]
) -> None:
    """An epoch of the exploding-seed runs (seed-2 scaled by 1000, a global clip at 1.0 at every step) against
    its float64 pre-clip reference: every seed within 1e-5, the exploding seed ``exploding`` and the others
    ``healthy`` (one exploding seed does not make them look vanishing), and the clip facts as torch's clip
    gave them: every step clipped, the smallest factor."""
    assert summary.sampled_steps == len(factors)
    for seed_id, seed in summary.seeds.items():
        assert seed.total_norm == pytest.approx(totals[seed_id], rel=1e-5)
        for layer, value in seed.layer_norms.items():
            assert value == pytest.approx(layers[seed_id][layer], rel=1e-5)
    assert {seed_id: seed.health for seed_id, seed in summary.seeds.items()} == {
        "seed-0": "healthy",
        "seed-1": "healthy",
        "seed-2": "exploding",
    }
    assert all(factor < 1 for factor in factors)
    assert summary.clip_steps == summary.clipped_steps == len(factors)
    assert summary.min_clip_factor == pytest.approx(min(factors), rel=1e-5)
