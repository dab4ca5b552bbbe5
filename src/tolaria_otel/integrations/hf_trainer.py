"""Hugging Face integration: ``Trainer(..., callbacks=[SeedLayerCallback(seeds)])``.

Needs ``transformers`` (extra ``tolaria-otel[transformers]``). The callback makes a
:class:`~tolaria_otel.SeedLayerTelemetry` for the Trainer's model at the start of each ``train()``,
measures every optimizer step, summarises at each epoch end (or every ``every_n_steps`` optimizer
steps, for ``max_steps`` training over a stream) and closes at the end of ``train()``.

What is measured, and when: the gradient before clipping, the one whose norm the Trainer logs as
``grad_norm``. The Trainer sums ``gradient_accumulation_steps`` micro-batches and, at every optimizer
step, calls accelerate's ``Accelerator.clip_grad_norm_`` (with ``max_grad_norm``, or ``inf`` when it
is 0 to get the norm alone), which unscales fp16 and calls ``torch.nn.utils.clip_grad_norm_``; all
of that happens before any callback runs, and callbacks get no reference to the Trainer. So the
callback takes that clip over while the run lasts (``clipping``: the clip's own per-tensor norms are
the step's values and its factor goes into ``EpochSummary.clipped_steps`` / ``min_clip_factor``), and
the step post-hook of the optimizer inside accelerate's ``AcceleratedOptimizer`` commits them: a step
that fp16 loss scaling skips never reaches that optimizer and is not counted. Under DeepSpeed (which
clips inside its engine) and FSDP1 (``model.clip_grad_norm_``) the values are after clipping, and a
warning says so.

Each summary also goes to the Trainer's logs under the keys of
:func:`~tolaria_otel.integrations.framework_run.framework_metrics`, as one log entry of its own at the
epoch's end (or at the end of the step that made it, with ``every_n_steps``; the rest at ``on_train_end``):
appended to ``state.log_history`` as ``Trainer.log`` appends (with ``epoch`` and ``step``) and handed to
every callback's ``on_log``, so each ``report_to`` integration (TensorBoard, W&B, MLflow, ...) and the
printer get it. A callback gets no reference to the Trainer, and the ``report_to`` callbacks come before
user callbacks, so adding keys in ``on_log`` would reach neither them nor ``log_history``: the callback
takes the Trainer's ``CallbackHandler`` from the frame that calls its ``on_train_begin`` (the handler's
``call_event``). Where that frame is not one (another Trainer), the entry goes to ``log_history`` only, and
a warning says so once. ``log_to_framework=False`` turns it off.

The ``TrainerCallback`` API has no hook for a failed ``train()``: a run that raises keeps its
telemetry attached until the next ``train()`` starts (which closes it) or ``close()`` is called.
"""

from __future__ import annotations

import inspect
import warnings
from types import FrameType
from typing import Any

import transformers
from torch import nn
from transformers.trainer_callback import CallbackHandler

from .framework_run import FrameworkCallback, framework_metrics


def _calling_handler() -> CallbackHandler | None:
    """The ``CallbackHandler`` whose ``call_event`` is calling the hook that calls this, or None."""
    here = inspect.currentframe()
    frame: FrameType | None = None if here is None or here.f_back is None else here.f_back.f_back
    for _ in range(3):  # the hook's caller: call_event (then on_train_begin, then the Trainer)
        if frame is None:
            return None
        handler = frame.f_locals.get("self")
        if isinstance(handler, CallbackHandler):
            return handler
        frame = frame.f_back
    return None


class SeedLayerCallback(FrameworkCallback, transformers.TrainerCallback):
    """Per-seed, per-layer gradient summaries of a Hugging Face ``Trainer.train()``.

    ``seeds`` and the keywords: see :class:`~tolaria_otel.framework_run.FrameworkCallback`.
    """

    def on_train_begin(
        self,
        args: Any,
        state: Any,
        control: Any,
        model: nn.Module | None = None,
        optimizer: object = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(model, nn.Module) or optimizer is None:
            raise TypeError(
                f"the Trainer passed model={type(model).__name__}, optimizer={type(optimizer).__name__} "
                "to on_train_begin: expected a torch.nn.Module and its optimizer"
            )
        self._handler = _calling_handler() if self.log_to_framework else None
        if self.log_to_framework and self._handler is None and not getattr(self, "_warned_no_handler", False):
            self._warned_no_handler = True
            warnings.warn(
                "SeedLayerCallback found no transformers CallbackHandler calling on_train_begin: its summaries "
                "go to state.log_history only, not to the report_to integrations",
                stacklevel=2,
            )
        # closes a train() that raised
        # The Trainer adds 1 to state.global_step after optimizer.step(): inside it, the 0-based index of
        # the step (logged under global_step + 1).
        self._start_run(
            model,
            [optimizer],
            deepspeed=bool(getattr(args, "deepspeed", None)),
            global_step=lambda: int(state.global_step),
        )

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._has_unlogged():  # a summary of every_n_steps
            self._log(args, state, control)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._end_epoch()
        self._log(args, state, control)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._summarise_rest()
        self._log(args, state, control)
        self._close_run()

    def _log(self, args: Any, state: Any, control: Any) -> None:
        """Each summary not logged yet as a log entry of its own, as ``Trainer.log`` makes one."""
        for summary in self._take_unlogged():
            logs: dict[str, float] = framework_metrics(summary)
            if state.epoch is not None:
                logs["epoch"] = state.epoch
            state.log_history.append({**logs, "step": state.global_step})
            handler = getattr(self, "_handler", None)
            if handler is not None:
                should_log = control.should_log  # the handler's on_log resets it: a loss log due now stays due
                handler.on_log(args, state, control, logs=logs)
                control.should_log = should_log

    def close(self) -> None:
        """Summarise what is left, detach and close; ``train()``'s end does it (and a new one after a failure)."""
        self._close_run()
