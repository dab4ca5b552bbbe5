"""One training run inside a framework (Lightning's ``fit``, the Hugging Face ``Trainer.train``).

What the framework callbacks share: a :class:`SeedLayerTelemetry` made at the start of the run,
measured once per optimizer step on the gradients after the framework's accumulation and AMP
unscaling and *before its clipping* (``clipping``: the framework's clip hands its norms over, or
Lightning's ``on_before_optimizer_step`` measures), committed by the optimizer's step post-hook so
that a step AMP skips is not counted, summarised at each epoch end or every N optimizer steps, and
closed at the end of the run. The clip is reported on its own (``EpochSummary.clipped_steps``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from opentelemetry.metrics import MeterProvider
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..capture.optimizer_hooks import EveryOptimizer, OptimizerSteps, unwrap_optimizer
from ..config.settings import SeedLayerSettings
from ..measure.seeds import SeedSource, StageNames
from ..summary.epoch_summary import EpochSummary
from ..telemetry import SeedLayerTelemetry


@dataclass(frozen=True)
class RunOptions:
    """What a framework callback was given; the keywords of :class:`SeedLayerTelemetry` and two more."""

    seeds: SeedSource
    settings: SeedLayerSettings
    meter_provider: MeterProvider | None
    attributes: Mapping[str, str] | None
    stage_names: StageNames | None
    every_n_steps: int | None
    on_summary: Callable[[EpochSummary], object] | None

    def __post_init__(self) -> None:
        every = self.every_n_steps
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ValueError(
                f"every_n_steps={every!r} is not valid: expected None (summarise at each epoch end) "
                "or an int >= 1 (summarise every that many optimizer steps)"
            )
        if self.on_summary is not None and not callable(self.on_summary):
            raise TypeError(
                f"on_summary is {type(self.on_summary).__name__}: expected a callable taking an EpochSummary, or None"
            )


class FrameworkRun:
    """The telemetry of one run of a framework's training loop, from its start to its end."""

    def __init__(
        self,
        model: nn.Module,
        optimizers: Sequence[object],
        options: RunOptions,
        *,
        deepspeed: bool = False,
        global_step: Callable[[], int] | None = None,
    ) -> None:
        self.options = options
        #: The framework's global step read in the optimizer's step hook: the 0-based index of the step
        #: being measured (the framework counts it once the step is done).
        self._global_step = global_step
        self.telemetry = SeedLayerTelemetry(
            model,
            options.seeds,
            settings=options.settings,
            meter_provider=options.meter_provider,
            attributes=options.attributes,
            stage_names=options.stage_names,
        )
        self._steps_unsummarised = 0
        self._hook: RemovableHandle | None = None
        if self.telemetry.enabled:
            self._hook = self._attach(model, optimizers)
            self.telemetry._attach_clip(deepspeed=deepspeed)

    def _attach(self, model: nn.Module, optimizers: Sequence[object]) -> RemovableHandle:
        """One optimizer (the usual case): a hook on it, about 1 µs a step. Several, or one that is no
        torch optimizer inside (DeepSpeed's own): every optimizer that holds a parameter of the model,
        counted once when they step on the same gradients."""
        if len(optimizers) == 1:
            try:
                return OptimizerSteps(unwrap_optimizer(optimizers[0]), self._after_optimizer_step).handle
            except TypeError:
                pass
        return EveryOptimizer(model, self._after_optimizer_step).handle

    def before_clip(self) -> None:
        """The gradients are final and not clipped yet (Lightning's ``on_before_optimizer_step``)."""
        self.telemetry.measure_before_clip()

    def epoch_end(self) -> None:
        """The framework's epoch ended: summarise, unless summaries go every N steps."""
        if self.options.every_n_steps is None:
            self._summarise()

    def close(self) -> None:
        """The run ended: summarise steps not summarised yet (a run stopped mid-epoch), detach, close."""
        if self._hook is None:
            return
        self._hook.remove()
        self._hook = None
        try:
            if self._steps_unsummarised:
                self._summarise()
        finally:
            self.telemetry.close()

    def _after_optimizer_step(self) -> None:
        self.telemetry.observe_step(step=None if self._global_step is None else self._global_step())
        self._steps_unsummarised += 1
        if self._steps_unsummarised == self.options.every_n_steps:
            self._summarise()

    def _summarise(self) -> None:
        self._steps_unsummarised = 0
        summary = self.telemetry.end_epoch()
        if summary is not None and self.options.on_summary is not None:
            self.options.on_summary(summary)


class FrameworkCallback:
    """What both framework callbacks hold: their options and the run in progress, if any.

    A mix-in: ``class SeedLayerCallback(FrameworkCallback, pl.Callback)``. ``seeds`` and the keywords
    are those of :class:`SeedLayerTelemetry` (``settings`` defaults to ``SeedLayerSettings.from_env()``,
    read here); ``every_n_steps`` summarises every that many optimizer steps instead of at each epoch end;
    ``on_summary`` gets each :class:`EpochSummary` (Tamiyo's in-process view).
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
        super().__init__()
        self.options = RunOptions(
            seeds,
            SeedLayerSettings.from_env() if settings is None else settings,
            meter_provider,
            attributes,
            stage_names,
            every_n_steps,
            on_summary,
        )
        self._run: FrameworkRun | None = None

    @property
    def telemetry(self) -> SeedLayerTelemetry | None:
        """The running run's telemetry, or None between runs."""
        return None if self._run is None else self._run.telemetry

    def _start_run(
        self,
        model: nn.Module,
        optimizers: Sequence[object],
        *,
        deepspeed: bool = False,
        global_step: Callable[[], int] | None = None,
    ) -> None:
        self._close_run()  # a run that failed before the framework could tell us
        self._run = FrameworkRun(model, optimizers, self.options, deepspeed=deepspeed, global_step=global_step)

    def _before_clip(self) -> None:
        if self._run is not None:
            self._run.before_clip()

    def _end_epoch(self) -> None:
        if self._run is not None:
            self._run.epoch_end()

    def _close_run(self) -> None:
        if self._run is not None:
            self._run.close()
            self._run = None
