"""When an optimizer step is measured: hooks on one optimizer, or on every optimizer of the process.

Both count a step from a step *post*-hook: by then a closure passed to ``step`` (Lightning, LBFGS)
has run its backward and ``GradScaler`` has unscaled, and the gradients are still there
(``zero_grad`` comes later). A step ``GradScaler`` skips (inf or NaN found) never reaches the
optimizer's ``step``, so it is not counted. The values are those before clipping: a clip the package
sees (``clipping``) has handed over the step's norms before it scaled, and the hook commits them; with
no clip, the hook measures the gradients as they are. A closure evaluated several times in one step
(LBFGS with ``max_iter > 1``) is measured once, on the gradients of its last evaluation.

Under ``torch.compile`` of the optimizer step, dynamo traces the post-hooks along with the step.
PyTorch's optimizers break the graph after the update, so the hooks run in a frame of their own
that holds no tensor work. The hooks here have dynamo skip that frame (run it eagerly) before they
read any state of theirs, and run the telemetry with dynamo off: the package adds no graph, no
graph break, no guard and no recompile to a compiled step (``tests/test_compile.py`` counts them).
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.hooks import RemovableHandle


def unwrap_optimizer(optimizer: object) -> torch.optim.Optimizer:
    """The innermost ``torch.optim.Optimizer`` of a wrapper (accelerate's ``AcceleratedOptimizer``,
    Lightning's ``LightningOptimizer``, anything with an inner ``optimizer`` or ``_optimizer``).

    The innermost, because a wrapper may subclass ``Optimizer`` without being one: accelerate's
    never runs ``Optimizer.__init__``, so it has no step hooks, and its ``step`` calls the inner one's.
    """
    inner: object = optimizer
    for _ in range(8):  # wrappers of wrappers, but never a cycle
        nested = getattr(inner, "optimizer", None) or getattr(inner, "_optimizer", None)
        if (
            not isinstance(nested, torch.optim.Optimizer)
            and not hasattr(nested, "optimizer")
            and not hasattr(nested, "_optimizer")
        ):
            break
        inner = nested
    if isinstance(inner, torch.optim.Optimizer) and hasattr(inner, "_optimizer_step_post_hooks"):
        return inner
    raise TypeError(
        f"attach() got {type(optimizer).__name__}: expected a torch.optim.Optimizer or a wrapper with "
        "one in its .optimizer attribute; or call attach() with no argument to measure every optimizer "
        "that holds the model's parameters"
    )


class _StepHook:
    """A step post-hook whose work runs eagerly, also after a compiled step (module docstring).

    When dynamo traces the hook (in the step's tail, or in a frame of its own once that tail runs
    eagerly) the hook asks it to skip the frame, in the hook's own frame: ``skip_frame`` called
    from a helper would only break the graph there. The work itself runs with dynamo off, so that
    no frame of the telemetry is compiled.
    """

    def __init__(self, work: Callable[[torch.optim.Optimizer], None]) -> None:
        self._work = work
        self._uncompiled: Callable[[torch.optim.Optimizer], None] | None = None

    def __call__(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if torch.compiler.is_compiling():
            dynamo: Any = torch._dynamo  # loaded: it is tracing this
            skip_frame = getattr(dynamo, "skip_frame", None)
            if skip_frame is not None:
                skip_frame("tolaria_otel: optimizer step hooks run eagerly")
            else:  # an older dynamo: a graph break there runs the hook eagerly too
                dynamo.graph_break()
        work = self._uncompiled
        if work is None:
            if "torch._dynamo" not in sys.modules:  # nothing compiles yet, and loading it takes a second
                self._work(optimizer)
                return
            work = self._uncompiled = torch.compiler.disable(self._work)
        work(optimizer)


class OptimizerSteps:
    """Every step of one optimizer: ``observe`` after each."""

    def __init__(self, optimizer: torch.optim.Optimizer, observe: Callable[[], None]) -> None:
        #: Removes the hook.
        self.handle: RemovableHandle = optimizer.register_step_post_hook(_StepHook(lambda _: observe()))


class EveryOptimizer:
    """A process-wide step post-hook that survives the optimizer being replaced.

    It counts a step of any optimizer that holds a parameter of ``model``, once per training step:
    when several such optimizers step one after the other on the same gradients (one per seed, or
    host and seeds apart), only the first is counted. "The same gradients" means the same tensor
    object at the same version for the first of the model's parameters that has a gradient; a new
    backward, or ``zero_grad``, changes one of the two.
    """

    def __init__(self, model: nn.Module, observe: Callable[[], None]) -> None:
        # Weakly: the process-wide hook must not keep a model (and a telemetry it may lead to) alive.
        self._model = weakref.ref(model)
        self._observe = observe
        # optimizer -> (parameter count when checked, holds a model parameter)
        self._holds: weakref.WeakKeyDictionary[torch.optim.Optimizer, tuple[int, bool]] = weakref.WeakKeyDictionary()
        self._last_grad: weakref.ref[torch.Tensor] | None = None
        self._last_version = -1
        #: Removes the process-wide hook.
        self.handle: RemovableHandle = register_optimizer_step_post_hook(_StepHook(self._count_step))

    def _count_step(self, optimizer: torch.optim.Optimizer) -> None:
        model = self._model()
        if model is None or not self._holds_model_parameter(optimizer, model):
            return
        grad = next((param.grad for param in model.parameters() if param.grad is not None), None)
        if grad is not None:
            if self._last_grad is not None and self._last_grad() is grad and grad._version == self._last_version:
                return  # another optimizer of the same training step
            self._last_grad, self._last_version = weakref.ref(grad), grad._version
        self._observe()

    def _holds_model_parameter(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> bool:
        count = sum(len(group["params"]) for group in optimizer.param_groups)
        cached = self._holds.get(optimizer)
        if cached is None or cached[0] != count:
            model_params = {id(p) for p in model.parameters()}
            holds = any(id(p) in model_params for group in optimizer.param_groups for p in group["params"])
            self._holds[optimizer] = cached = (count, holds)
        return cached[1]
