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

from collections.abc import Callable, Mapping

import lightning.pytorch as pl
from opentelemetry.metrics import MeterProvider

from .framework_run import FrameworkRun, RunOptions
from .seeds import SeedSource, StageNames
from .settings import SeedLayerSettings
from .summary import EpochSummary
from .telemetry import SeedLayerTelemetry


class SeedLayerCallback(pl.Callback):
    """Per-seed, per-layer gradient summaries of a Lightning ``fit``.

    ``seeds`` and the keywords are those of :class:`~tolaria_otel.SeedLayerTelemetry` (``settings``
    defaults to ``SeedLayerSettings.from_env()``, read here); ``every_n_steps`` summarises every that
    many optimizer steps instead of at each epoch end (step-based training); ``on_summary`` gets each
    :class:`~tolaria_otel.EpochSummary` (Tamiyo's in-process view). ``telemetry`` is the running
    fit's, or ``None`` between fits.
    """

    def __init__(
        self,
        seeds: SeedSource,
        *,
        settings: SeedLayerSettings | None = None,
        meter_provider: MeterProvider | None = None,
        attributes: Mapping[str, str] | None = None,
        stage_names: StageNames | None = None,
        every_n_steps: int | None = None,
        on_summary: Callable[[EpochSummary], object] | None = None,
    ) -> None:
        self.options = RunOptions(seeds, SeedLayerSettings.from_env() if settings is None else settings,
                                  meter_provider, attributes, stage_names, every_n_steps, on_summary)
        self._run: FrameworkRun | None = None

    @property
    def telemetry(self) -> SeedLayerTelemetry | None:
        return None if self._run is None else self._run.telemetry

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()  # a fit that failed before Lightning could tell us
        self._run = FrameworkRun(pl_module, trainer.optimizers, self.options)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._run is not None:
            self._run.epoch_end()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        if self._run is not None:
            self._run.close()
            self._run = None
