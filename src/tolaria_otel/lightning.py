"""Lightning integration: ``Trainer(callbacks=[SeedLayerCallback(seeds)])``.

Needs ``lightning`` (extra ``tolaria-otel[lightning]``). The callback makes a
:class:`~tolaria_otel.SeedLayerTelemetry` for the ``LightningModule`` at the start of each ``fit``,
measures every optimizer step from the optimizer's step post-hook, summarises at each training epoch
end (or every ``every_n_steps`` optimizer steps) and closes at the end of ``fit``, or when it fails.

What is measured, and when: the gradients the optimizer applies. Lightning runs the last
micro-batch's backward inside ``optimizer.step(closure)``, then unscales (``16-mixed``) and clips
(``gradient_clip_val``) before the update; the post-hook comes after all of them, once per optimizer
step, with ``accumulate_grad_batches`` micro-batches summed. So the values are *after clipping*,
unlike ``lightning.pytorch.utilities.grad_norm`` in ``on_before_optimizer_step``, which sees them
before. A step that ``16-mixed`` skips for inf or NaN is not measured.
"""

from __future__ import annotations

import lightning.pytorch as pl

from .framework_run import FrameworkCallback


class SeedLayerCallback(FrameworkCallback, pl.Callback):
    """Per-seed, per-layer gradient summaries of a Lightning ``fit``.

    ``seeds`` and the keywords: see :class:`~tolaria_otel.framework_run.FrameworkCallback`.
    """

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start_run(pl_module, trainer.optimizers)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end_epoch()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close_run()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close_run()
