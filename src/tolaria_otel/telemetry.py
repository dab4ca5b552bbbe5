"""SeedLayerTelemetry: ties the seed source, the step path, the epoch's fold and the instruments together.

The class is the public face and the lifecycle (attach, close, the lock, "never raises into
training"); each seam its docstring names is a part of its own, below this module:
``seed_tracker.SeedTracker`` reads the seed source and keeps the segments and the epoch's stages,
``step_path.StepPath`` queues the sampled steps on the device and folds the epoch,
``pre_clip.PreClipListener`` holds what a clip measured before it scaled, ``summarise`` turns the
folded epoch into its ``EpochSummary``, and ``instruments.SeedLayerInstruments`` publishes it.
"""

from __future__ import annotations

import functools
import logging
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from opentelemetry import metrics
from opentelemetry.metrics import MeterProvider
from torch import nn
from torch.utils.hooks import RemovableHandle

from .capture.optimizer_hooks import EveryOptimizer, OptimizerSteps, unwrap_optimizer
from .capture.sampling import Sampling
from .capture.staged_step import PreClipListener
from .capture.torch_clip import clip_and_stage
from .config.settings import ENV_ENABLED, SeedLayerSettings
from .export.instruments import RESERVED_ATTRIBUTES, SeedLayerInstruments, trainer_instruments
from .failures import FailureLog
from .measure.seed_tracker import SeedTracker
from .measure.seeds import SeedSource, StageNames
from .reduce.ranks import RankReduction
from .step_path import StepPath
from .summary.epoch_summary import EpochSummary
from .summary.from_sums import summarise

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11


class SeedLayerTelemetry:
    """Per-seed, per-layer gradient norms of a training run, summarised per epoch.

    Call :meth:`observe_step` once per optimizer step, after the gradients are final (or let
    :meth:`attach` do it from optimizer step hooks), and :meth:`end_epoch` at each epoch end.
    The seed source is read at every sampled step (one call, then an identity check of the seed
    modules), so seeds may come and go at any step. With ``settings.enabled`` false nothing is
    installed or allocated and both return at once. Telemetry trouble (a failing seed source, an
    odd gradient) is logged, never raised into the training loop; bad arguments to the constructor
    are raised at once. Safe to call from several threads (one lock; uncontended on the step path).

    ``attributes`` identify the trainer when several share one process and one meter provider
    (``{"env_id": "3"}``): they go on every point. One identity is one open telemetry per provider: it
    is free again once the telemetry is closed or garbage-collected unclosed (which closes it), and
    ``replace=True`` closes an open one with the same identity and takes it over (Esper recreating its
    environments). ``stage_names`` names ``int`` stages (a protobuf enum's ``Name``, or a mapping).
    ``export_each_epoch`` (on by default): each epoch end starts an export of a pushing provider off the
    training thread, so that every epoch reaches the store whatever the export interval; off, only the
    reader's interval exports (docs/reference.md, "When epochs are exported").
    """

    def __init__(
        self,
        model: nn.Module,
        seeds: SeedSource,
        *,
        settings: SeedLayerSettings | None = None,
        meter_provider: MeterProvider | None = None,
        attributes: Mapping[str, str] | None = None,
        stage_names: StageNames | None = None,
        replace: bool = False,
        export_each_epoch: bool = True,
    ) -> None:
        identity = _checked_arguments(model, settings, meter_provider, attributes, stage_names)
        for name, flag in (("replace", replace), ("export_each_epoch", export_each_epoch)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} is {type(flag).__name__}: expected True or False")
        self.settings = SeedLayerSettings.from_env() if settings is None else settings
        self.model = model
        self.attributes = identity
        self.epoch = 0
        self._failures = FailureLog()
        self._enabled = self.settings.enabled
        if not self._enabled:
            logging.getLogger(__name__).info(
                "tolaria_otel: %s is off: nothing is measured or exported (set %s=true to measure)",
                ENV_ENABLED,
                ENV_ENABLED,
            )
            return
        self._lock = threading.Lock()
        self._hooks: list[RemovableHandle] = []
        # Under torch.distributed every rank reduces and one exports (docs/distributed.md); else None.
        self._ranks = RankReduction.current(self.settings.export_rank)
        # The parts hold no reference back to this object: a telemetry dropped unclosed is collected at
        # once, and its clip listener (held weakly by the process-wide clip patch) detaches with it.
        self._seeds = SeedTracker(
            model,
            seeds,
            stage_names,
            self.settings,
            keep_rows=self._ranks is not None,
            failures=self._failures,
            attached=functools.partial(_any_active, self._hooks),
        )
        self._sampling = Sampling(self.settings.sample_every)
        self._pre_clip = PreClipListener(
            model, self._seeds.measured_parameters, self._sampling.next_is_sampled, self._lock, self._failures
        )
        self._steps = StepPath(self._sampling, self._seeds, self._ranks, self._lock, self._failures)
        self._instruments: SeedLayerInstruments | None = None
        if self._ranks is None or self._ranks.rank == self.settings.export_rank:
            provider = metrics.get_meter_provider() if meter_provider is None else meter_provider
            self._instruments = trainer_instruments(
                provider, self.settings, identity, replace=replace, export_each_epoch=export_each_epoch, owner=self
            )
        # Dropped without close(), the telemetry is closed when it is collected: its hooks removed, its identity
        # free (its clip listener, held weakly by the clip patch, detaches as it goes). The finalizer holds
        # neither the telemetry nor anything that may lead back to it (the model may).
        self._finalizer = weakref.finalize(self, _release, self._hooks, self._instruments)
        self._finalizer.atexit = False

    @property
    def enabled(self) -> bool:
        return self._enabled

    @property
    def exports(self) -> bool:
        """True where the summaries are exported: the export rank, or the only process without torch.distributed."""
        return self._enabled and self._instruments is not None

    @property
    def failures(self) -> int:
        """How many times telemetry trouble was logged instead of raised (the first of each kind as a warning)."""
        return self._failures.count

    def observe_step(self, *, step: int | None = None) -> None:
        """Queue this optimizer step's gradient norms on the device. No host sync.

        Call it once per optimizer step, after the backward (and the AMP unscale) and before any clip
        the package does not see. A clip it sees (:meth:`clip_grad_norm_`, or torch's
        ``clip_grad_norm_`` / ``clip_grad_value_`` while attached) hands over the norms it took before
        it scaled, so that clip and the optimizer step may come first; a clip it does not see (your own,
        or torch's while not attached) must come after, or be preceded by :meth:`measure_before_clip`.
        Either way the values are the gradients before clipping.
        ``step`` (an int >= 0) is this optimizer step's number in your own count, reported as
        ``SeedSummary.max_step``; without it steps are counted from 0 at the first observed one. A bad
        value is logged (``failures``) and the count goes on.
        """
        if not self._enabled:
            return
        if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
            try:
                raise ValueError(f"observe_step(step={step!r}): expected an int >= 0")
            except ValueError:  # telemetry must never stop training: logged, and the step counted instead
                self._failures("observe_step(step=...)")
            step = None
        self._steps.observe(*self._pre_clip.take(), step=step)

    def clip_grad_norm_(
        self,
        parameters: torch.Tensor | Iterable[torch.Tensor],
        max_norm: float,
        norm_type: float = 2.0,
        error_if_nonfinite: bool = False,
        foreach: bool | None = None,
    ) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` that measures this step before it clips, in one pass.

        The per-gradient norms the clip takes anyway are this step's values, and its factor
        (``min(max_norm / (total + 1e-6), 1)``) goes into the epoch's clip facts; the next
        :meth:`observe_step` (or the attached optimizer's step) commits them, so a step that
        ``GradScaler`` skips is not counted. Returns what torch returns, equal to it for float32 and
        float64 gradients; float16 and bfloat16 gradients are normed in float32 here (torch norms them
        in their own precision), so the total and factor differ from torch's by that rounding.
        With the telemetry off, or at a step that is not sampled, it is torch's function.
        """
        original = torch.nn.utils.clip_grad.clip_grad_norm_  # torch's own, never the patch
        if not self._enabled or not self._sampling.next_is_sampled():
            return original(
                parameters, max_norm, norm_type=norm_type, error_if_nonfinite=error_if_nonfinite, foreach=foreach
            )
        return clip_and_stage(parameters, max_norm, norm_type, error_if_nonfinite, foreach, [self._pre_clip], original)

    def attach(self, optimizer: object | None = None) -> RemovableHandle:
        """Observe optimizer steps from a step post-hook; ``handle.remove()`` detaches.

        With an optimizer (or a wrapper of one): every step of that optimizer. With none: every step
        of any optimizer in the process that holds a parameter of the model, once per training step,
        so replacing the optimizer changes nothing (``optimizer_hooks.EveryOptimizer``).
        The step is measured before clipping: until :meth:`close`, ``torch.nn.utils.clip_grad_norm_``
        and ``clip_grad_value_`` on the model's parameters hand this step's norms over before they
        scale (``clipping``); a clip the package cannot reach is named in a warning here.
        """
        if not self._enabled:
            return RemovableHandle(OrderedDict())  # a handle whose remove() has nothing to do
        if _any_active(self._hooks):
            raise RuntimeError(
                "attach() was already called on this SeedLayerTelemetry and its hook is still "
                "attached: a second one would measure every step twice; remove the first handle "
                "(handle.remove()) before attaching again"
            )
        self._attach_clip()
        observe = _weakly(self.observe_step)  # a hook does not keep a telemetry dropped unclosed alive
        if optimizer is None:
            handle = EveryOptimizer(self.model, observe).handle
        else:
            handle = OptimizerSteps(unwrap_optimizer(optimizer), observe).handle
        self._hooks.append(handle)
        self._seeds.warn_outside_model(self._seeds.current.modules)
        return handle

    def end_epoch(self) -> EpochSummary | None:
        """Reduce the epoch (one device-to-host copy), publish its top-K and return the summary."""
        if not self._enabled:
            return None
        with self._lock:
            summary = EpochSummary(self.epoch, self._steps.sampled_steps, self.settings.top_k, {})
            try:
                self._seeds.settle()
                folded = self._steps.fold(self.epoch)
                if folded is None:
                    summary = EpochSummary(self.epoch, 0, self.settings.top_k, {})
                else:
                    summary = summarise(self.epoch, self.settings.top_k, *folded, self._seeds.partial)
                if self._instruments is not None:
                    self._instruments.publish(summary)
            except Exception:  # noqa: BLE001
                self._failures("end_epoch")
            self.epoch += 1
            self._steps.start_epoch()
            self._seeds.start_epoch()
            self._pre_clip.start_epoch()
        return summary

    def close(self) -> None:
        """Detach from the optimizers and stop exporting after the next collection, which still
        carries the last epoch (the next periodic export, a ``force_flush()`` or the provider's
        shutdown). Returns at once: no I/O on the training thread. The provider stays the
        caller's to shut down."""
        if not self._enabled:
            return
        self._enabled = False
        self._pre_clip.detach()
        self._finalizer()  # once: the same release as a telemetry collected unclosed

    def _attach_clip(self, *, deepspeed: bool = False) -> None:
        """Take the clips of the model's parameters until close (``attach()``, the framework callbacks)."""
        self._pre_clip.attach(deepspeed=deepspeed)

    def measure_before_clip(self) -> None:
        """Measure this step now: the gradients are final (after the backward and the AMP unscale) and a
        clip the package does not see is about to scale them. No host sync.

        The next :meth:`observe_step` (or the attached optimizer's step) commits these norms as the step's
        values, after that clip; a step that ``GradScaler`` skips never commits, and they are dropped.
        Only at a sampled step; with the feature off it does nothing. Lightning's callback calls it in
        ``on_before_optimizer_step``; a loop calls it right before its own clip (docs/esper.md).
        """
        if self._enabled:
            self._pre_clip.measure_before_clip()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _release(hooks: list[RemovableHandle], instruments: SeedLayerInstruments | None) -> None:
    """What closing a telemetry releases: its hooks and its identity (then no more exports)."""
    for hook in hooks:
        hook.remove()
    if instruments is not None:
        instruments.close()


def _weakly(method: Callable[[], None]) -> Callable[[], None]:
    """``method`` called through a weak reference to its object: nothing once the object is collected."""
    ref = weakref.WeakMethod(method)

    def call() -> None:
        target = ref()
        if target is not None:
            target()

    return call


def _any_active(handles: Sequence[RemovableHandle]) -> bool:
    """Whether some hook handle is still registered (``remove()`` takes its id out of the hooks dict)."""
    for handle in handles:
        hooks = handle.hooks_dict_ref()
        if hooks is not None and handle.id in hooks:
            return True
    return False


def _checked_arguments(
    model: object,
    settings: object,
    meter_provider: object,
    attributes: Mapping[str, str] | None,
    stage_names: object,
) -> dict[str, str]:
    """Fail fast on a constructor argument of the wrong kind, naming it and what is accepted; the identity."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model is {type(model).__name__}: expected a torch.nn.Module")
    if settings is not None and not isinstance(settings, SeedLayerSettings):
        raise TypeError(
            f"settings is {type(settings).__name__}: expected a SeedLayerSettings "
            "(SeedLayerSettings.from_env()) or None"
        )
    if meter_provider is not None and not callable(getattr(meter_provider, "get_meter", None)):
        raise TypeError(
            f"meter_provider is {type(meter_provider).__name__}: expected an OpenTelemetry "
            "MeterProvider (configure_meter_provider()) or None for the global one"
        )
    identity = _checked_identity(attributes)
    if stage_names is not None and not (callable(stage_names) or isinstance(stage_names, Mapping)):
        raise TypeError(
            f"stage_names is {type(stage_names).__name__}: expected a mapping int -> str or a "
            "callable such as a protobuf enum's Name"
        )
    return identity


def _checked_identity(attributes: Mapping[str, str] | None) -> dict[str, str]:
    if attributes is None:
        return {}
    if not isinstance(attributes, Mapping):
        raise TypeError(
            f"attributes is {type(attributes).__name__}: expected a mapping str -> str, for example {{'env_id': '3'}}"
        )
    for key, value in attributes.items():
        if not isinstance(key, str) or not key or not isinstance(value, str):
            raise TypeError(f"attributes[{key!r}] = {value!r}: expected non-empty str keys and str values")
        if key in RESERVED_ATTRIBUTES:
            raise ValueError(
                f"attributes[{key!r}]: {key!r} is one of the package's own attributes "
                f"({', '.join(sorted(RESERVED_ATTRIBUTES))}); name the trainer with another key, "
                "for example env_id"
            )
    return dict(attributes)
