"""One training run inside a framework (Lightning's ``fit``, the Hugging Face ``Trainer.train``).

What the framework callbacks share: a :class:`SeedLayerTelemetry` made at the start of the run,
measured once per optimizer step on the gradients after the framework's accumulation and AMP
unscaling and *before its clipping* (``clipping``: the framework's clip hands its norms over, or
Lightning's ``on_before_optimizer_step`` measures), committed by the optimizer's step post-hook so
that a step AMP skips is not counted, summarised at each epoch end or every N optimizer steps, and
closed at the end of the run. The clip is reported on its own (``EpochSummary.clipped_steps``).

Nothing is silent: a callback made while the feature is off warns once (:class:`FeatureOffWarning`);
with the feature on and nothing to export to (no ``meter_provider=`` and no SDK provider set globally)
the callback builds its own provider from the ``OTEL_*`` variables when they name an endpoint or an
exporter, owns it and shuts it down at the end of the run, or else warns once how to export.
Each summary also goes to the framework's own logs (:func:`framework_metrics`; ``log_to_framework``).
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from opentelemetry import metrics
from opentelemetry.metrics import MeterProvider
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..capture.optimizer_hooks import EveryOptimizer, OptimizerSteps, unwrap_optimizer
from ..config.environment import value as env_value
from ..config.otel_env import ENV_ENDPOINT, ENV_EXPORTER, ENV_METRICS_ENDPOINT
from ..config.settings import ENV_ENABLED, SeedLayerSettings
from ..export.provider import configure_meter_provider
from ..measure.seeds import SeedSource, StageNames
from ..summary.epoch_summary import EpochSummary
from ..telemetry import SeedLayerTelemetry

_logger = logging.getLogger("tolaria_otel.telemetry")  # the telemetry's messages, under the name users filter on

#: The variables that say where to export: with one set and no provider given, a callback builds its own.
EXPORT_VARIABLES = (ENV_ENDPOINT, ENV_METRICS_ENDPOINT, ENV_EXPORTER)
#: What a key of the framework's logs may hold: what TensorBoard, W&B, CSV and MLflow all accept.
_KEY_PART = re.compile(r"[^A-Za-z0-9_.\-]")


class FeatureOffWarning(UserWarning):
    """A framework callback was added while ``TOLARIA_SEED_LAYER_SUMMARIES_ENABLED`` is off: it measures nothing.

    ``warnings.filterwarnings("ignore", category=FeatureOffWarning)`` silences it where off is meant."""


class NothingExportedWarning(UserWarning):
    """The feature is on but nothing is configured to export: the summaries go to ``on_summary`` and the
    framework's logs only."""


def framework_metrics(summary: EpochSummary) -> dict[str, float]:
    """An epoch's summary as the framework's logs get it: per seed ``tolaria/seed/<seed_id>/norm`` (the
    epoch's RMS), ``.../norm_max`` (its largest step) and ``.../layer/<layer>`` for each top-K layer. A seed
    not measured has no key. Every character outside ``A-Z a-z 0-9 _ . -`` in a seed id or a layer name
    becomes ``_`` (``(root)``: ``_root_``), so that every logger takes the keys as they are."""
    out: dict[str, float] = {}
    for seed_id, seed in summary.seeds.items():
        prefix = f"tolaria/seed/{_KEY_PART.sub('_', seed_id)}"
        if seed.total_norm is not None:
            out[f"{prefix}/norm"] = float(seed.total_norm)
        if seed.max_norm is not None:
            out[f"{prefix}/norm_max"] = float(seed.max_norm)
        for layer, value in seed.top_layers:
            out[f"{prefix}/layer/{_KEY_PART.sub('_', layer)}"] = float(value)
    return out


def _global_provider_configured() -> bool:
    """Whether the application set a global provider: anything but the API's own proxy or no-op one."""
    return not type(metrics.get_meter_provider()).__module__.startswith("opentelemetry.metrics")


def _export_named(environ: Mapping[str, str]) -> bool:
    return any(env_value(environ, name) is not None for name in EXPORT_VARIABLES)


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
        sink: Callable[[EpochSummary], None] | None = None,
    ) -> None:
        self.options = options
        #: Gets each summary after ``on_summary`` (the framework's logs), or None.
        self._sink = sink
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

    def summarise_rest(self) -> None:
        """Summarise the steps not summarised yet (a run stopped mid-epoch), before the run's end."""
        if self._hook is not None and self._steps_unsummarised:
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
        if summary is None:
            return
        if self.options.on_summary is not None:
            self.options.on_summary(summary)
        if self._sink is not None:
            self._sink(summary)


class FrameworkCallback:
    """What both framework callbacks hold: their options and the run in progress, if any.

    A mix-in: ``class SeedLayerCallback(FrameworkCallback, pl.Callback)``. ``seeds`` and the keywords
    are those of :class:`SeedLayerTelemetry` (``settings`` defaults to ``SeedLayerSettings.from_env()``,
    read here); ``every_n_steps`` summarises every that many optimizer steps instead of at each epoch end;
    ``on_summary`` gets each :class:`EpochSummary` (Tamiyo's in-process view); ``log_to_framework=False``
    keeps the summaries out of the framework's own logs (:func:`framework_metrics`).

    Made while the feature is off, it warns once (:class:`FeatureOffWarning`). With the feature on, no
    ``meter_provider`` and no SDK provider set globally (``metrics.set_meter_provider``), each run builds
    its own with :func:`~tolaria_otel.configure_meter_provider` when one of ``OTEL_EXPORTER_OTLP_ENDPOINT``,
    ``OTEL_EXPORTER_OTLP_METRICS_ENDPOINT`` or ``OTEL_METRICS_EXPORTER`` is set, and shuts it down at the
    end of the run (the last epoch's export); with none set it warns once (:class:`NothingExportedWarning`)
    and exports nothing.
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
        log_to_framework: bool = True,
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
        if not isinstance(log_to_framework, bool):
            raise TypeError(f"log_to_framework is {type(log_to_framework).__name__}: expected True or False")
        self.log_to_framework = log_to_framework
        self._run: FrameworkRun | None = None
        self._owned_provider: MeterProvider | None = None
        self._warned_nothing_exported = False
        #: Summaries not yet in the framework's logs, oldest first.
        self._unlogged: list[EpochSummary] = []
        if not self.options.settings.enabled:
            warnings.warn(
                f"{type(self).__name__} measures nothing: {ENV_ENABLED} is off. Set {ENV_ENABLED}=true "
                "in the environment (or pass settings=SeedLayerSettings(enabled=True)) to measure",
                FeatureOffWarning,
                stacklevel=2,
            )

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
        options = self.options
        if options.settings.enabled and options.meter_provider is None and not _global_provider_configured():
            options = replace(options, meter_provider=self._own_provider())
        self._unlogged = []
        sink = self._unlogged.append if self.log_to_framework else None
        self._run = FrameworkRun(model, optimizers, options, deepspeed=deepspeed, global_step=global_step, sink=sink)

    def _own_provider(self) -> MeterProvider | None:
        """A provider from the ``OTEL_*`` variables for this run, when they say where to export; else a warning."""
        if _export_named(os.environ):
            self._owned_provider = configure_meter_provider(self.options.settings)  # bad configuration raises
            _logger.info(
                "tolaria_otel: %s exports through its own MeterProvider built from the OTEL_* variables "
                "(no meter_provider= given, no SDK provider set globally); it is shut down at the end of the run",
                type(self).__name__,
            )
            return self._owned_provider
        if not self._warned_nothing_exported:
            self._warned_nothing_exported = True
            warnings.warn(
                f"{type(self).__name__} exports nothing: no meter_provider= was given, no OpenTelemetry SDK "
                f"MeterProvider is set globally and none of {', '.join(EXPORT_VARIABLES)} is set. Set "
                f"{ENV_ENDPOINT} (the callback then builds its own provider and shuts it down at the end of "
                "the run) or pass meter_provider=tolaria_otel.configure_meter_provider(); the summaries still "
                "go to on_summary and the framework's logs",
                NothingExportedWarning,
                stacklevel=2,
            )
        return None

    def _has_unlogged(self) -> bool:
        return bool(self._unlogged)

    def _take_unlogged(self) -> list[EpochSummary]:
        """The summaries for the framework's logs since the last call."""
        taken, self._unlogged[:] = list(self._unlogged), []
        return taken

    def _before_clip(self) -> None:
        if self._run is not None:
            self._run.before_clip()

    def _end_epoch(self) -> None:
        if self._run is not None:
            self._run.epoch_end()

    def _summarise_rest(self) -> None:
        if self._run is not None:
            self._run.summarise_rest()

    def _close_run(self) -> None:
        run, provider = self._run, self._owned_provider
        self._run = self._owned_provider = None
        try:
            if run is not None:
                run.close()
        finally:
            if provider is not None:
                _shutdown(provider)


def _shutdown(provider: MeterProvider) -> None:
    """Shut down a provider the callback built: the final export (bounded by the OTLP timeout); never raises."""
    try:
        shutdown = getattr(provider, "shutdown", None)
        if shutdown is not None:
            shutdown()
    except Exception:
        _logger.warning("tolaria_otel: shutting down the callback's own MeterProvider failed", exc_info=True)
