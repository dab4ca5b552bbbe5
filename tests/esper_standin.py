"""A stand-in for Esper's training loop (esper-lite 2016337e), shaped as its code is; none of Esper's code.

What it copies of Esper, because the package's Esper wiring depends on it (docs/esper.md):

- the model has ``seed_slots`` (slot ids ``r{row}c{col}``) of ``SeedSlot`` modules with ``seed``,
  ``alpha_schedule`` (a gate module created inside the slot when a gated seed starts blending) and
  ``state`` (``stage``, an ``IntEnum``; ``seed_id`` stamped with the episode, ``ep{n}_env{e}_seed_{k}``);
  ``get_parameters()`` is the seed's and the gate's;
- ``process_train_batch``: one host optimizer and one per slot that has a state (created lazily), a backward,
  then a clip through ``torch.nn.utils.clip_grad_norm_`` of the host and then of every slot that has a state,
  separately, a GERMINATED slot (outside the forward graph, no gradient) included, then every optimizer's step;
- the environment state (model and optimizers) is recreated at every episode, with the same env id.

``Reference`` is the float64 pre-clip truth of each step, taken where Esper's own collector runs (after the
backward, before the clip).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

CHANNELS = 8
#: Esper's defaults (gradient_collector.py, leyline): the clip and the per-tensor health bounds.
MAX_GRAD_NORM = 1.0
VANISHING_BELOW = 1e-7
EXPLODING_ABOVE = 10.0


class SeedStage(enum.IntEnum):
    """Esper's ``leyline.stages.SeedStage`` (the values it has)."""

    UNKNOWN = 0
    DORMANT = 1
    GERMINATED = 2
    TRAINING = 3
    BLENDING = 4
    HOLDING = 6
    FOSSILIZED = 7
    PRUNED = 8


@dataclass
class SeedState:
    seed_id: str
    stage: SeedStage


class Gate(nn.Module):
    """A learnable per-sample gate, as Esper's ``gated`` blend (a module with parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(CHANNELS, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.gate(x))


class SeedSlot(nn.Module):
    def __init__(self, slot_id: str) -> None:
        super().__init__()
        self.slot_id = slot_id
        self.seed: nn.Module | None = None
        self.alpha_schedule: nn.Module | None = None
        self.state: SeedState | None = None
        self.gated = False

    def germinate(self, seed_id: str, *, gated: bool = False, dead_parameter: bool = False) -> None:
        seed = nn.Sequential(nn.Linear(CHANNELS, CHANNELS), nn.Tanh(), nn.Linear(CHANNELS, CHANNELS))
        if dead_parameter:  # a tensor whose gradient is exactly zero: vanishing at every step
            seed.register_parameter("dead", nn.Parameter(torch.ones(CHANNELS)))
        self.seed = seed
        self.state = SeedState(seed_id, SeedStage.GERMINATED)
        self.gated = gated

    def advance(self, stage: SeedStage) -> None:
        assert self.state is not None
        self.state.stage = stage
        if stage == SeedStage.BLENDING and self.gated:
            self.alpha_schedule = Gate()  # created inside the slot, as Esper's start_blending does

    def prune(self) -> None:
        self.seed = self.alpha_schedule = None
        self.state = None

    def get_parameters(self) -> list[nn.Parameter]:
        params = list(self.seed.parameters()) if self.seed is not None else []
        return params + (list(self.alpha_schedule.parameters()) if self.alpha_schedule is not None else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state, seed = self.state, self.seed
        if state is None or seed is None or state.stage == SeedStage.GERMINATED:
            return x  # outside the graph: no gradient
        out = seed(x)
        dead = getattr(seed, "dead", None)
        if dead is not None:
            out = out + 0.0 * dead
        if self.alpha_schedule is not None:
            return x + self.alpha_schedule(x) * out
        return x + 0.5 * out


class StandinModel(nn.Module):
    """Esper's MorphogeneticModel in shape: a host with slots between its layers."""

    def __init__(self, slots: tuple[str, ...] = ("r0c0", "r0c1")) -> None:
        super().__init__()
        self.host = nn.ModuleList([nn.Linear(CHANNELS, CHANNELS) for _ in range(len(slots) + 1)])
        self.seed_slots = nn.ModuleDict({slot: SeedSlot(slot) for slot in slots})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer, slot in zip(self.host, [*self.seed_slots.values(), None]):
            x = torch.tanh(layer(x))
            if slot is not None:
                x = slot(x)
        return x

    def slot(self, slot_id: str) -> SeedSlot:
        slot = self.seed_slots[slot_id]
        assert isinstance(slot, SeedSlot)
        return slot

    def slots(self) -> list[SeedSlot]:
        return [self.slot(slot_id) for slot_id in self.seed_slots]

    def get_host_parameters(self) -> list[nn.Parameter]:
        return list(self.host.parameters())

    def get_seed_parameters(self, slot: str) -> list[nn.Parameter]:
        return self.slot(slot).get_parameters()


@dataclass
class EnvState:
    model: StandinModel
    host_optimizer: torch.optim.Optimizer
    seed_optimizers: dict[str, torch.optim.Optimizer] = field(default_factory=dict)


def create_env_state(seed: int) -> EnvState:
    torch.manual_seed(seed)
    model = StandinModel()
    return EnvState(model, torch.optim.SGD(model.get_host_parameters(), lr=0.05, momentum=0.9))


def process_train_batch(
    env: EnvState,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    loss_scale: float = 1.0,
    before_clip: Callable[[StandinModel], None] | None = None,
) -> None:
    """Esper's ``process_train_batch`` without AMP or streams: backward, (collector), clips, steps."""
    model = env.model
    slots = [slot.slot_id for slot in model.slots() if slot.state is not None]
    for slot_id in slots:
        if slot_id not in env.seed_optimizers:
            env.seed_optimizers[slot_id] = torch.optim.SGD(model.get_seed_parameters(slot_id), lr=0.05, momentum=0.9)
    env.host_optimizer.zero_grad(set_to_none=True)
    for slot_id in slots:
        env.seed_optimizers[slot_id].zero_grad(set_to_none=True)
    loss = nn.functional.mse_loss(model(inputs), targets) * loss_scale
    loss.backward()
    if before_clip is not None:
        before_clip(model)  # where Esper's collector runs
    torch.nn.utils.clip_grad_norm_(model.get_host_parameters(), MAX_GRAD_NORM)
    for slot_id in slots:
        params = model.get_seed_parameters(slot_id)
        if params:
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
    env.host_optimizer.step()
    for slot_id in slots:
        env.seed_optimizers[slot_id].step()


@dataclass
class StepTruth:
    """One step of one slot, float64, before the clip: what Esper's collector computes."""

    squares: dict[str, float]  # per layer (named as the slot names its modules), squared norm
    total: float  # the slot's gradient norm
    tensors: int  # tensors with a gradient
    vanishing: int
    exploding: int
    numel: int


class Reference:
    """The float64 truth per slot and step (and the host's), recorded at ``before_clip``."""

    def __init__(self) -> None:
        self.steps: list[dict[str, StepTruth]] = []
        self.host: list[tuple[float, int]] = []

    def __call__(self, model: StandinModel) -> None:
        step = {}
        for slot in model.slots():
            if slot.state is not None:
                step[slot.slot_id] = truth_of(slot)
        self.steps.append(step)
        host = [p.grad.double() for p in model.get_host_parameters() if p.grad is not None]
        self.host.append((math.sqrt(sum(float(g.pow(2).sum()) for g in host)), sum(g.numel() for g in host)))

    def reset(self) -> None:
        self.steps, self.host = [], []


def truth_of(slot: nn.Module) -> StepTruth:
    squares: dict[str, float] = {}
    norms: list[float] = []
    numel = 0
    for name, module in slot.named_modules():
        if name == "":
            continue
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        grads = [p.grad.double() for p in own if p.grad is not None]
        squares[name] = sum(float(g.pow(2).sum()) for g in grads)
        norms.extend(float(g.norm()) for g in grads)
        numel += sum(g.numel() for g in grads)
    return StepTruth(
        squares,
        math.sqrt(sum(n * n for n in norms)),
        len(norms),
        sum(n < VANISHING_BELOW for n in norms),
        sum(not n <= EXPLODING_ABOVE for n in norms),
        numel,
    )


def esper_fields(norm: float, tensors: int, vanishing: int, exploding: int) -> tuple[float, float, bool, bool]:
    """Esper's ``materialize_grad_stats`` from its parts."""
    if not tensors:
        return 0.0, 1.0, False, False
    health = (
        max(0.0, min(1.0, 1.0 - 0.5 * vanishing / tensors - 0.8 * exploding / tensors)) if math.isfinite(norm) else 0.0
    )
    return norm, health, vanishing > 0, exploding > 0


def esper_ratio(seed: float, seed_numel: int, host: float, host_numel: int) -> float:
    """Esper's ``DualGradientStats.normalized_ratio``."""
    if host < 1e-8 or seed < 1e-8 or not host_numel or not seed_numel:
        return 0.0
    return (seed / seed_numel**0.5) / (host / host_numel**0.5 + 1e-8)


def batches(generator: torch.Generator, count: int, batch: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [
        (torch.randn(batch, CHANNELS, generator=generator), torch.randn(batch, CHANNELS, generator=generator))
        for _ in range(count)
    ]
