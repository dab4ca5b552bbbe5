"""Lightning integration: ``Trainer(callbacks=[SeedLayerCallback(seeds)])``.

Needs ``lightning`` (extra ``tolaria-otel[lightning]``). The callback makes a
:class:`~tolaria_otel.SeedLayerTelemetry` for the ``LightningModule`` at the start of each ``fit``,
measures every optimizer step, summarises at each training epoch end (or every ``every_n_steps``
optimizer steps) and closes at the end of ``fit``, or when it fails.

What is measured, and when: the gradient before clipping, as ``lightning.pytorch.utilities.grad_norm``
sees it. Lightning runs the last micro-batch's backward inside ``optimizer.step(closure)``, unscales
(``16-mixed``), calls ``on_before_optimizer_step``, then clips (``gradient_clip_val``, by norm or by
value) and updates. The callback takes over torch's clip functions for the run, as ``attach()`` does:
Lightning's clip calls ``torch.nn.utils.clip_grad_norm_`` / ``clip_grad_value_``, which hand the step's
norms (``accumulate_grad_batches`` micro-batches summed) over before they scale; with no clip the
optimizer's step post-hook measures the gradient as it is. So a step costs what ``attach()`` costs a plain
loop (measuring again in ``on_before_optimizer_step``, as before, cost a second norm pass and a staged copy
per step, and bought nothing: a clip the patch does not see invalidates staged norms anyway, and the step
is then measured after it, as with ``attach()``). The optimizer's step post-hook commits the step:
a step that ``16-mixed`` skips for inf or NaN never reaches the optimizer and is not counted. A clip
by norm is reported on its own (``EpochSummary.clipped_steps``, ``min_clip_factor``). Under
DeepSpeed, which clips inside its engine, the values are after clipping, and a warning says so.

Each summary also goes to every Lightning logger (TensorBoard, W&B, CSV, MLflow, ...) under the keys of
:func:`~tolaria_otel.integrations.framework_run.framework_metrics`: ``logger.log_metrics(keys,
step=trainer.global_step)`` on each of ``trainer.loggers`` (rank 0), at the training epoch's end, or with
``every_n_steps`` at the end of the batch whose step made it, and the steps left at a run's end at
``on_train_end``. Not ``pl_module.log_dict``: Lightning's logging machinery costs about a millisecond per
key at the epoch end (20 keys for 4 seeds at top-3: 5-10 % of a short epoch), and ``log_dict(on_step=True)``
would repeat a summary at every logging step until the next. So the keys are not in
``trainer.callback_metrics`` (nothing to monitor for ``ModelCheckpoint``); ``on_summary`` is the way to act
on them. ``log_to_framework=False`` turns it off.
"""

from __future__ import annotations

import lightning.pytorch as pl

from .framework_run import FrameworkCallback, framework_metrics


class SeedLayerCallback(FrameworkCallback, pl.Callback):
    """Per-seed, per-layer gradient summaries of a Lightning ``fit``.

    ``seeds`` and the keywords: see :class:`~tolaria_otel.framework_run.FrameworkCallback`.
    """

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        deepspeed = type(trainer.strategy).__name__.startswith("DeepSpeed")
        # Inside optimizer.step Lightning has not counted the step yet: global_step is its 0-based index.
        self._start_run(
            pl_module, trainer.optimizers, deepspeed=deepspeed, global_step=lambda: int(trainer.global_step)
        )

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: object, batch: object, batch_idx: int
    ) -> None:
        if self._has_unlogged():  # a summary of every_n_steps: once, at its step (log_dict would repeat it each step)
            self._to_loggers(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end_epoch()
        self._to_loggers(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._summarise_rest()  # Lightning takes no log_dict here: the loggers get the rest directly
        self._to_loggers(trainer)

    def _to_loggers(self, trainer: pl.Trainer) -> None:
        for summary in self._take_unlogged():
            if trainer.loggers and trainer.is_global_zero:  # every rank has the same summary; rank 0 logs
                for logger in trainer.loggers:
                    logger.log_metrics(framework_metrics(summary), step=trainer.global_step)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close_run()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close_run()
