"""Hugging Face integration: ``Trainer(..., callbacks=[SeedLayerCallback(seeds)])``.

Needs ``transformers`` (extra ``tolaria-otel[transformers]``). The callback makes a
:class:`~tolaria_otel.SeedLayerTelemetry` for the Trainer's model at the start of each ``train()``,
measures every optimizer step from the step post-hook of the optimizer inside accelerate's
``AcceleratedOptimizer``, summarises at each epoch end (or every ``every_n_steps`` optimizer steps,
for ``max_steps`` training over a stream) and closes at the end of ``train()``.

What is measured, and when: the gradients the optimizer applies. The Trainer sums
``gradient_accumulation_steps`` micro-batches, clips to ``max_grad_norm`` (unscaling fp16 first) and
then steps; the post-hook comes after all of them, once per optimizer step. So the values are *after
clipping*, unlike the Trainer's logged ``grad_norm``, which is the norm before clipping. A step that
fp16 loss scaling skips for inf or NaN is not measured.

The ``TrainerCallback`` API has no hook for a failed ``train()``: a run that raises keeps its
telemetry attached until the next ``train()`` starts (which closes it) or ``close()`` is called.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import transformers
from opentelemetry.metrics import MeterProvider
from torch import nn

from .framework_run import FrameworkRun, RunOptions
from .seeds import SeedSource, StageNames
from .settings import SeedLayerSettings
from .summary import EpochSummary
from .telemetry import SeedLayerTelemetry


class SeedLayerCallback(transformers.TrainerCallback):
    """Per-seed, per-layer gradient summaries of a Hugging Face ``Trainer.train()``.

    ``seeds`` and the keywords are those of :class:`~tolaria_otel.SeedLayerTelemetry` (``settings``
    defaults to ``SeedLayerSettings.from_env()``, read here); ``every_n_steps`` summarises every that
    many optimizer steps instead of at each epoch end; ``on_summary`` gets each
    :class:`~tolaria_otel.EpochSummary` (Tamiyo's in-process view). ``telemetry`` is the running
    ``train()``'s, or ``None`` between runs.
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

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                       optimizer: object = None, **kwargs: Any) -> None:
        if not isinstance(model, nn.Module) or optimizer is None:
            raise TypeError(f"the Trainer passed model={type(model).__name__}, optimizer={type(optimizer).__name__} "
                            "to on_train_begin: expected a torch.nn.Module and its optimizer")
        self.close()  # a train() that raised
        self._run = FrameworkRun(model, [optimizer], self.options)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._run is not None:
            self._run.epoch_end()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.close()

    def close(self) -> None:
        """Summarise what is left, detach and close; ``train()``'s end does it (and a new one after a failure)."""
        if self._run is not None:
            self._run.close()
            self._run = None
