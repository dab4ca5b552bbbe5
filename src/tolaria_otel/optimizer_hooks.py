"""When an optimizer step is measured: hooks on one optimizer, or on every optimizer of the process.

Both measure from a step *post*-hook: by then a closure passed to ``step`` (Lightning, LBFGS) has
run its backward, ``GradScaler`` has unscaled and the caller has clipped, and the gradients are
still there (``zero_grad`` comes later). A step ``GradScaler`` skips (inf or NaN found) never
reaches the optimizer's ``step``, so it is not measured. A closure evaluated several times in one
step (LBFGS with ``max_iter > 1``) is measured once, on the gradients of its last evaluation.

Under ``torch.compile`` of the optimizer step, dynamo traces the post-hooks with the step. The
hooks here hand dynamo one call of :func:`_after_compiled_step` with constant and tensor
arguments, registered in ``torch._dynamo.config.reorderable_logging_functions``: dynamo puts that
call after the compiled graph, at run time, instead of tracing into the telemetry, so the package
adds no graph break, no guard on its own state and no recompile.
"""

from __future__ import annotations

import itertools
import logging
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.hooks import RemovableHandle

_logger = logging.getLogger(__name__)

#: Live hooks by key: the one argument of a compiled step's call that says which hook it was.
_hooks: weakref.WeakValueDictionary[int, _StepHook] = weakref.WeakValueDictionary()
_keys = itertools.count()
_registered_with_dynamo = False


def unwrap_optimizer(optimizer: object) -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` inside a wrapper (accelerate's ``AcceleratedOptimizer``,
    Lightning's ``LightningOptimizer``, anything with an inner ``optimizer``)."""
    inner: object = optimizer
    for _ in range(8):  # wrappers of wrappers, but never a cycle
        if isinstance(inner, torch.optim.Optimizer):
            return inner
        inner = getattr(inner, "optimizer", None) or getattr(inner, "_optimizer", None)
        if inner is None:
            break
    raise TypeError(f"attach() got {type(optimizer).__name__}: expected a torch.optim.Optimizer or a wrapper with "
                    "one in its .optimizer attribute; or call attach() with no argument to measure every optimizer "
                    "that holds the model's parameters")


class _StepHook:
    """A step post-hook that dynamo does not trace into (see the module docstring)."""

    def __init__(self) -> None:
        _register_with_dynamo()
        self._key = next(_keys)
        _hooks[self._key] = self

    def after_compiled_step(self, params: Sequence[torch.Tensor]) -> None:
        raise NotImplementedError


def _after_compiled_step(key: int, params: Sequence[torch.Tensor]) -> None:
    """Run by a compiled optimizer step after its graph: the eager side of a traced hook."""
    hook = _hooks.get(key)
    if hook is not None:
        hook.after_compiled_step(params)


def _register_with_dynamo() -> None:
    """Let dynamo call :func:`_after_compiled_step` after a compiled step's graph.

    Imports dynamo (about a second, once per process) so that an optimizer step compiled after
    ``attach`` finds the function registered; a torch without dynamo has nothing to register.
    """
    global _registered_with_dynamo
    if _registered_with_dynamo:
        return
    _registered_with_dynamo = True
    try:
        import torch._dynamo  # noqa: PLC0415 - heavy, and needed only once something is attached

        torch._dynamo.config.reorderable_logging_functions.add(_after_compiled_step)
    except Exception:  # noqa: BLE001 - without it a compiled step still runs the hook, with a graph break
        _logger.debug("tolaria_otel: torch._dynamo not available; compiled optimizer steps trace the hook",
                      exc_info=True)


class OptimizerSteps(_StepHook):
    """Every step of one optimizer: ``observe`` after each."""

    def __init__(self, optimizer: torch.optim.Optimizer, observe: Callable[[], None]) -> None:
        super().__init__()
        self._observe = observe
        #: Removes the hook.
        self.handle: RemovableHandle = optimizer.register_step_post_hook(self._after_step)

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if torch.compiler.is_compiling():
            _after_compiled_step(self._key, ())
            return
        self._observe()

    def after_compiled_step(self, params: Sequence[torch.Tensor]) -> None:
        self._observe()


class EveryOptimizer(_StepHook):
    """A process-wide step post-hook that survives the optimizer being replaced.

    It counts a step of any optimizer that holds a parameter of ``model``, once per training step:
    when several such optimizers step one after the other on the same gradients (one per seed, or
    host and seeds apart), only the first is counted. "The same gradients" means the same tensor
    object at the same version for the first of the model's parameters that has a gradient; a new
    backward, or ``zero_grad``, changes one of the two.
    """

    def __init__(self, model: nn.Module, observe: Callable[[], None]) -> None:
        super().__init__()
        self._model = model
        self._observe = observe
        # optimizer -> (parameter count when checked, holds a model parameter)
        self._holds: weakref.WeakKeyDictionary[torch.optim.Optimizer, tuple[int, bool]] = weakref.WeakKeyDictionary()
        self._last_grad: weakref.ref[torch.Tensor] | None = None
        self._last_version = -1
        #: Removes the process-wide hook.
        self.handle: RemovableHandle = register_optimizer_step_post_hook(self._after_step)

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if torch.compiler.is_compiling():
            # Traced: the optimizer's parameters go to the eager side as tensors (dynamo passes
            # nothing else); no state of this object is read here, so nothing of it is guarded.
            _after_compiled_step(self._key, [param for group in optimizer.param_groups for param in group["params"]])
            return
        count = sum(len(group["params"]) for group in optimizer.param_groups)
        cached = self._holds.get(optimizer)
        if cached is None or cached[0] != count:
            self._holds[optimizer] = cached = (count, self._holds_model_parameter(
                param for group in optimizer.param_groups for param in group["params"]))
        if cached[1]:
            self._observe_once_per_gradient()

    def after_compiled_step(self, params: Sequence[torch.Tensor]) -> None:
        if self._holds_model_parameter(params):
            self._observe_once_per_gradient()

    def _holds_model_parameter(self, params: Any) -> bool:
        model_params = {id(p) for p in self._model.parameters()}
        return any(id(p) in model_params for p in params)

    def _observe_once_per_gradient(self) -> None:
        grad = next((param.grad for param in self._model.parameters() if param.grad is not None), None)
        if grad is not None:
            if self._last_grad is not None and self._last_grad() is grad and grad._version == self._last_version:
                return  # another optimizer of the same training step
            self._last_grad, self._last_version = weakref.ref(grad), grad._version
        self._observe()
