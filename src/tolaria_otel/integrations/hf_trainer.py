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

The ``TrainerCallback`` API has no hook for a failed ``train()``: a run that raises keeps its
telemetry attached until the next ``train()`` starts (which closes it) or ``close()`` is called.
"""

from __future__ import annotations

from typing import Any

import transformers
from torch import nn

from .framework_run import FrameworkCallback


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
        # closes a train() that raised
        # The Trainer adds 1 to state.global_step after optimizer.step(): inside it, the 0-based index of
        # the step (logged under global_step + 1).
        self._start_run(
            model,
            [optimizer],
            deepspeed=bool(getattr(args, "deepspeed", None)),
            global_step=lambda: int(state.global_step),
        )

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._end_epoch()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._close_run()

    def close(self) -> None:
        """Summarise what is left, detach and close; ``train()``'s end does it (and a new one after a failure)."""
        self._close_run()
