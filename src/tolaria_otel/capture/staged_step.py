"""The telemetry's side of measuring before the clip (``torch_clip``): a step's norms wait for its commit.

A clip that runs before the optimizer step hands its per-gradient norms over (or the telemetry
measures just before it), and the step that commits them (the optimizer's step post-hook, or
``observe_step()``) queues them as that step's values; a step ``GradScaler`` skips never commits, and
its norms are dropped. The norms and the clip's factors go on to the step path as they are
(``measure.segment``, ``measure.clip_facts``).

Each factor travels with the clip's parameters, as the clip handed them over: the ids of those that had a
gradient (the keys of its norms; no copy), so that the commit can tell a clip of one seed's parameters from
a clip of the host's or of several seeds' (``Segment.clip_owner``). A clip whose norms were not shared (a
norm other than L2, DTensor gradients) comes with its factor only: its parameters are not known here.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, TypeAlias

import torch
from torch import nn

from ..failures import FailureLog
from .torch_clip import attach_clip_patch, l2_norms, warn_unreachable_clip

#: One clip of a step: its factor (a 0-d tensor on the device) and its parameters that had a gradient, by id
#: (the clip's own norms mapping, in the clip's order; None: not known).
StagedClip: TypeAlias = tuple[torch.Tensor, Mapping[int, torch.Tensor] | None]


class HasGradient(Protocol):
    """A measured parameter (or the stand-in of a DTensor's local shard, ``measure.local_gradients``)."""

    @property
    def grad(self) -> torch.Tensor | None: ...


class PreClipListener:
    """One telemetry's :class:`~tolaria_otel.capture.torch_clip.ClipListener`: takes the clips of its model's
    parameters before a sampled step, while attached (:meth:`attach` until :meth:`detach`).

    ``next_is_sampled`` says whether the coming optimizer step is measured: the clips of the others
    are left alone. ``measured`` gives the parameters a step measures (those of the seeds listed now),
    for a clip whose norms cannot be shared. ``lock`` is the telemetry's: a clip may run on another
    thread than the step.
    """

    def __init__(
        self,
        model: nn.Module,
        measured: Callable[[], Sequence[HasGradient]],
        next_is_sampled: Callable[[], bool],
        lock: threading.Lock,
        failures: FailureLog,
    ) -> None:
        self._model = model
        self._measured = measured
        self._next_is_sampled = next_is_sampled
        self._lock = lock
        self._failures = failures
        self._staged = PreClipStep()
        self._remove_patch: Callable[[], None] | None = None  # set while attached
        self._model_ids: frozenset[int] | None = None
        self._not_ours: set[int] = set()  # first parameters of clips found to be another model's

    def attach(self, *, deepspeed: bool = False) -> None:
        """Take the clips of the model's parameters until :meth:`detach` (once, however often attached)."""
        if self._remove_patch is None:
            self._remove_patch = attach_clip_patch(self).remove
            warn_unreachable_clip(self._model, deepspeed=deepspeed)

    def detach(self) -> None:
        if self._remove_patch is not None:
            self._remove_patch()
            self._remove_patch = None

    def take(self) -> tuple[dict[int, torch.Tensor] | None, Sequence[StagedClip]]:
        """What the committing step measured before its clip: (norms or None, its clips)."""
        if not self._staged.waiting:
            return None, ()
        return self._staged.take()

    def takes_clip(self, first_parameter: int) -> bool:
        """A clip of the model's parameters, before a sampled step, while attached."""
        if self._remove_patch is None or not self._next_is_sampled():
            return False
        if self._model_ids is None or (
            first_parameter not in self._model_ids and first_parameter not in self._not_ours
        ):
            # A parameter not seen yet: grafted since (a seed germinated mid-epoch), or another model's, once.
            self._model_ids = frozenset(id(param) for param in self._model.parameters())
            if first_parameter not in self._model_ids:
                self._not_ours.add(first_parameter)
        return first_parameter in self._model_ids

    def stage_clip(self, norms: dict[int, torch.Tensor], factor: torch.Tensor) -> None:
        with self._lock:
            self._staged.stage(norms, factor, norms)

    def clip_applied(self, factor: torch.Tensor | None, parameter: torch.Tensor | None) -> None:
        with self._lock:
            self._staged.mark(parameter)  # first: the clip just changed the gradients' versions
            if factor is not None:
                self._staged.stage(None, factor)

    def measure_before_clip(self) -> None:
        """Take this step's norms now, before a clip runs (Lightning's ``on_before_optimizer_step``, a clip
        whose norms cannot be shared); the step that follows commits them. Only before a sampled step."""
        if not self._next_is_sampled():
            return
        with self._lock:
            try:
                present = [(id(holder), holder) for holder in self._measured() if holder.grad is not None]
                norms, order = l2_norms([holder.grad for _, holder in present])  # type: ignore[misc]  # not None
                self._staged.stage({present[i][0]: norm for i, norm in zip(order, norms)}, None)
                self._staged.mark(present[0][1] if present else None)  # type: ignore[arg-type]
            except Exception:  # noqa: BLE001
                self.failed("measure before clip")

    def failed(self, where: str) -> None:
        self._failures(where)

    def start_epoch(self) -> None:
        self._model_ids = None
        self._not_ours.clear()


class PreClipStep:
    """One step's norms taken before the clip, waiting for the optimizer step that commits them.

    Staged norms belong to the gradients they were taken from: the stage is marked with a gradient
    (the tensor and its version counter, bumped by the clip's in-place scaling), and a mark that no
    longer matches (``zero_grad``, the next backward) means the step they belong to never reached the
    optimizer: they are dropped, not carried into the next step.

    Each clip's norms are kept as the clip handed them over (its parameter set travels with its factor)
    and merged once, at :meth:`take`.
    """

    def __init__(self) -> None:
        self._norms: list[dict[int, torch.Tensor]] = []  # as staged, first first
        self.clips: list[StagedClip] = []
        self._mark: tuple[weakref.ref[torch.Tensor], weakref.ref[torch.Tensor], int] | None = None

    @property
    def waiting(self) -> bool:
        return bool(self._norms) or bool(self.clips)

    def fresh(self) -> bool:
        """The marked gradient is still the one the stage was taken from (or was since clipped here)."""
        if self._mark is None:
            return False
        param_ref, grad_ref, version = self._mark
        param = param_ref()
        grad = None if param is None else param.grad
        return grad is not None and grad is grad_ref() and grad._version == version

    def stage(
        self,
        norms: dict[int, torch.Tensor] | None,
        factor: torch.Tensor | None,
        parameters: Mapping[int, torch.Tensor] | None = None,
    ) -> None:
        """Norms (the caller's fresh dict: no copy on the step path) and a clip's factor, with the clip's
        parameters that had a gradient (``parameters``, by id; None: not known)."""
        if self.waiting and not self.fresh():
            self.clear()
        if norms:
            self._norms.append(norms)
        if factor is not None:
            self.clips.append((factor, parameters))

    def mark(self, parameter: torch.Tensor | None) -> None:
        """Tie the stage to ``parameter``'s gradient as it is now (after the clip that just ran)."""
        grad = None if parameter is None else parameter.grad
        self._mark = None if grad is None else (weakref.ref(parameter), weakref.ref(grad), grad._version)  # type: ignore[arg-type]

    def take(self) -> tuple[dict[int, torch.Tensor] | None, list[StagedClip]]:
        """What the committing step measured before its clip: (norms or None, its clips); then empty.

        A gradient keeps the norm first staged for it: a later measurement of the same step (a value
        clip's, after another group's clip scaled) may be after a clip."""
        if not self.fresh():
            self.clear()
            return None, []
        staged, clips = self._norms, self.clips
        self.clear()
        if not staged:
            return None, clips
        if len(staged) == 1:
            return staged[0], clips
        norms: dict[int, torch.Tensor] = {}
        for part in reversed(staged):  # the first staged last: its norms win
            norms.update(part)
        return norms, clips

    def clear(self) -> None:
        self._norms = []
        self.clips = []
        self._mark = None
