"""Measuring before the clip: a step's gradient is the one before clipping (docs/contracts.md).

Global clipping rescales every gradient by one factor chosen by the largest: measured after it, one
exploding seed looks calm and makes every other seed look vanishing. So a step is measured where the
gradient is final (accumulated, unscaled) and not yet clipped, and the clip is reported on its own
(per epoch: steps clipped, smallest factor, ``EpochSummary.clipped_steps`` / ``min_clip_factor``).

How each path gets there:

* A clip through :func:`torch.nn.utils.clip_grad_norm_` (plain loops, Lightning's
  ``gradient_clip_val``, the Hugging Face Trainer through accelerate's ``Accelerator.clip_grad_norm_``)
  measures and clips in one pass (:func:`clip_and_stage`): the per-tensor norms the clip takes
  anyway are the step's norms, and the clip's total gives its factor. Nothing is queued yet: the
  optimizer step that follows commits them (its post-hook, or ``observe_step()``), so a step that
  ``GradScaler`` skips, which never reaches the optimizer, is not counted. Parameters the clip did
  not cover are measured at the commit, when they are still unclipped.
* A clip the norms cannot be shared with (``clip_grad_value_``, a norm other than L2, DTensor
  gradients): the telemetry's parameters are measured just before it, the same way.
* Lightning's ``on_before_optimizer_step`` (after the closure's backward and the AMP unscale, before
  ``gradient_clip_val``) measures there, whatever clips after it.

Patching, the way OpenTelemetry instrumentations patch a library: while a telemetry is attached
(``attach()``, the framework callbacks), ``torch.nn.utils.clip_grad_norm_`` and
``torch.nn.utils.clip_grad_value_`` are replaced by wrappers (``functools.wraps`` of the originals,
so ``__wrapped__`` is torch's function). One patch serves every telemetry of the process; a clip is
taken by the telemetries whose model holds its first parameter, and a clip no telemetry takes runs
torch's own function untouched. The last telemetry to detach restores the functions that were there,
unless someone patched over ours since (then ours stays, as a pass-through). A clip the package cannot
reach at all (FSDP1's ``model.clip_grad_norm_``, DeepSpeed's engine) is named in a warning at attach,
with the way out.

A wrapper someone installed at ``torch.nn.utils.clip_grad_norm_`` before the telemetry attached (a
library's, the user's) is wrapped in turn, and keeps being called: the telemetries measure just before
it (one more foreach norm, as for a value clip), it clips, and the factor comes from the total it
returns; detach puts it back. Only over torch's own function is the clip done here, in one pass.

Clips bound at import: code that bound torch's function under its own name before the patch (``from
torch.nn.utils import clip_grad_norm_`` at the top of a training script, so in ``__main__``; ``from
torch.nn.utils.clip_grad import clip_grad_norm_ as clip``) would call torch's function, unseen, and its
step would be measured after the clip. At each attach the globals of every module in ``sys.modules``
(torch's and the package's left out) are scanned for torch's own function objects (by identity), and each
one found is rebound to the patch's wrapper of it, the one ``torch.nn.utils`` holds, until the last detach
restores it (unless the module set that name since: then its own choice stays). That is measured exactly
rather than only warned about because the wrapper is a pass-through for every clip no telemetry takes
(torch's function, same arguments, same result), and for the ones it takes it does what the patched
attribute does; a name is only ever changed from torch's function to the wrapper of that same function and
back. Said once per module at INFO; a module whose name cannot be set is named in a warning with the way
out. Not seen: a name bound after attach from ``torch.nn.utils.clip_grad`` (the module itself is not
patched), a local or class attribute holding torch's function, a name bound to someone else's wrapper.
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
import types
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, cast

import torch
from torch import nn
from torch.utils._foreach_utils import (
    _device_has_foreach_support,
    _group_tensors_by_device_and_dtype,
    _has_foreach_support,
)

_logger = logging.getLogger(__name__)

#: Gradients normed in float32 for the telemetry (its accumulators are float32): torch's own clip norms
#: them in their own precision, so for these the total (and the factor) differ from torch's by that rounding.
_HALF = frozenset({torch.float16, torch.bfloat16})

#: The factor torch's clip adds to the total: ``max_norm / (total + 1e-6)``, clamped at 1.
CLIP_EPSILON = 1e-6

Parameters = torch.Tensor | Iterable[torch.Tensor]


class ClipListener(Protocol):
    """What a telemetry offers the patch (``pre_clip.PreClipListener`` implements it)."""

    def takes_clip(self, first_parameter: int) -> bool:
        """Whether this clip, whose first parameter has this id, is one the listener measures before."""
        ...

    def stage_clip(self, norms: dict[int, torch.Tensor], factor: torch.Tensor) -> None:
        """The clip's per-gradient norms (by parameter id) and its factor, before it scales."""
        ...

    def measure_before_clip(self) -> None:
        """A clip whose norms cannot be shared is about to scale: measure now."""
        ...

    def clip_applied(self, factor: torch.Tensor | None, parameter: torch.Tensor | None) -> None:
        """The clip scaled (by ``factor`` when known); ``parameter`` is the first it clipped that has a gradient."""
        ...

    def failed(self, where: str) -> None:
        """One of the calls above raised: count and log it (``failures.FailureLog``)."""
        ...


def l2_norms(grads: Sequence[torch.Tensor], foreach: bool | None = None) -> tuple[list[torch.Tensor], list[int]]:
    """Per-tensor L2 norms, grouped as torch's clip groups them (device, dtype): the norms in that group
    order and, per norm, its index in ``grads``. Float16/bfloat16 gradients are normed in float32."""
    norms: list[torch.Tensor] = []
    order: list[int] = []
    for (device, dtype), (tensors, indices) in _by_device_and_dtype(list(grads), with_indices=True).items():
        wide = torch.float32 if dtype in _HALF else None
        if (foreach is None and _has_foreach_support(tensors, device)) or (
            foreach and _device_has_foreach_support(device)
        ):
            norms.extend(torch._foreach_norm(tensors, 2, dtype=wide) if wide else torch._foreach_norm(tensors, 2))
        elif foreach:
            raise RuntimeError(f"foreach=True was passed, but can't use the foreach API on {device.type} tensors")
        else:
            norms.extend(torch.linalg.vector_norm(g, 2, dtype=wide) for g in tensors)
        order.extend(indices)
    return norms, order


def _listed(parameters: Parameters) -> list[torch.Tensor]:
    return [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)


def _shareable(grads: Sequence[torch.Tensor]) -> bool:
    """Plain dense tensors: a DTensor's norm is its global one, and the telemetry needs the local shard's."""
    return all(type(g) is torch.Tensor and g.layout is torch.strided for g in grads)


@torch.no_grad()
def clip_and_stage(
    parameters: Parameters,
    max_norm: float,
    norm_type: float,
    error_if_nonfinite: bool,
    foreach: bool | None,
    listeners: Sequence[ClipListener],
    original: Callable[..., torch.Tensor],
) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_``, handing the norms it computes to ``listeners`` before it scales.

    Equal to torch's result for float32 and float64 gradients (same grouping, same ops, same order);
    float16/bfloat16 gradients are normed in float32 here, in their own precision by torch.
    """
    params = _listed(parameters)
    ids = []
    grads = []
    for param in params:
        grad = param.grad
        if grad is not None:
            ids.append(id(param))
            grads.append(grad)
    clip = functools.partial(
        original, params, max_norm, norm_type=norm_type, error_if_nonfinite=error_if_nonfinite, foreach=foreach
    )
    if not grads:  # nothing to scale (Esper clips a GERMINATED seed, outside the graph): the step stays as staged
        return clip()  # torch's clip_grad_norm_ returns its total
    if float(norm_type) != 2.0 or not _shareable(grads):
        measured: torch.Tensor = _measure_then(listeners, clip, max_norm, params)
        return measured
    norms, order = l2_norms(grads, foreach)
    first_device = grads[0].device
    total: torch.Tensor = torch.linalg.vector_norm(torch.stack([norm.to(first_device) for norm in norms]), 2.0)
    if error_if_nonfinite and torch.logical_or(total.isnan(), total.isinf()):
        raise RuntimeError(
            "The total norm of order 2.0 for gradients from `parameters` is non-finite, so it cannot be clipped. "
            "To disable this error and scale the gradients by the non-finite norm anyway, set "
            "`error_if_nonfinite=False`"
        )
    factor = torch.clamp(float(max_norm) / (total + CLIP_EPSILON), max=1.0)
    by_id = {ids[i]: norm for i, norm in zip(order, norms)}
    for listener in listeners:
        _safely(listener, "clip", functools.partial(listener.stage_clip, by_id, factor))
    _scale(grads, factor, foreach)
    first = next(param for param in params if param.grad is not None)
    for listener in listeners:
        _safely(listener, "clip", functools.partial(listener.clip_applied, None, first))
    return total


def _scale(grads: list[torch.Tensor], factor: torch.Tensor, foreach: bool | None) -> None:
    """``torch.nn.utils.clip_grads_with_norm_`` from the factor: the gradients are grouped once more, as there."""
    for (device, _), (device_grads, _) in _by_device_and_dtype(grads).items():
        if (foreach is None and _has_foreach_support(device_grads, device)) or (
            foreach and _device_has_foreach_support(device)
        ):
            torch._foreach_mul_(device_grads, factor.to(device))
        else:
            device_factor = factor.to(device)
            for grad in device_grads:
                grad.mul_(device_factor)


def _by_device_and_dtype(
    tensors: list[torch.Tensor], with_indices: bool = False
) -> dict[tuple[torch.device, torch.dtype], tuple[list[torch.Tensor], list[int]]]:
    """torch's own grouping (its clip's), typed: torch annotates the groups' items Optional; none is None here."""
    grouped = _group_tensors_by_device_and_dtype(
        [cast("list[torch.Tensor | None]", tensors)], with_indices=with_indices
    )
    return {key: (cast("list[torch.Tensor]", lists[0]), indices) for key, (lists, indices) in grouped.items()}


def _measure_then(
    listeners: Sequence[ClipListener],
    clip: Callable[[], Any],
    max_norm: Any,
    params: list[torch.Tensor],
    *,
    factor: bool = True,
) -> Any:
    """A clip whose norms cannot be shared: measure before it, run it, then note its factor (a norm clip's, from
    the total it returns: ``max_norm`` None, or ``factor=False``, for a clip without one). Returns what it returns.

    A clip of parameters none of which has a gradient scales nothing: it is only run."""
    first = next((param for param in params if param.grad is not None), None)
    if first is None:
        return clip()
    for listener in listeners:
        _safely(listener, "clip", listener.measure_before_clip)
    total = clip()
    scaled = None
    if factor and max_norm is not None and type(total) is torch.Tensor:
        try:
            scaled = torch.clamp(float(max_norm) / (total.detach() + CLIP_EPSILON), max=1.0)
        except (TypeError, ValueError, RuntimeError):  # a foreign clip's odd max_norm or total: no factor
            for listener in listeners:
                listener.failed("clip factor")
    for listener in listeners:
        _safely(listener, "clip", functools.partial(listener.clip_applied, scaled, first))
    return total


def _safely(listener: ClipListener, where: str, work: Callable[[], None]) -> None:
    try:
        work()
    except Exception:  # noqa: BLE001 - telemetry must never stop the clip
        listener.failed(where)


#: The clip functions the patch wraps (``torch.nn.utils.<name>``).
_NAMES = ("clip_grad_norm_", "clip_grad_value_")

#: Packages whose modules the scan for clips bound at import leaves alone: torch's own (``torch.nn.utils``
#: itself is patched by attribute) and the package's.
_SKIPPED = frozenset({"torch", "functorch", "tolaria_otel"})
_SKIPPED_PREFIXES = tuple(f"{package}." for package in sorted(_SKIPPED))

#: Every wrapper the patch made, to the function it calls: a wrapper found where torch's function was is
#: looked through (one left in place as a pass-through, then installed over again), never wrapped twice.
_OURS: weakref.WeakKeyDictionary[Callable[..., Any], Callable[..., Any]] = weakref.WeakKeyDictionary()

#: The modules named once per process (``(kind, module name)``) by the scan for clips bound at import.
_announced: set[tuple[str, str]] = set()


def torch_own(name: str) -> tuple[Callable[..., Any], ...]:
    """torch's own function objects for ``name``: ``torch.nn.utils.clip_grad.<name>`` (never patched here) and
    what its ``__wrapped__`` chain holds (torch's ``_no_grad`` decorator), those whose code is torch's ``clip_grad``
    module's: a wrapper someone put there is not torch's."""
    found: list[Callable[..., Any]] = []
    function: Any = getattr(torch.nn.utils.clip_grad, name, None)
    while function is not None and len(found) < 16 and all(function is not seen for seen in found):
        code = getattr(function, "__code__", None)
        if code is not None and code.co_filename == torch.nn.utils.clip_grad.__file__:
            found.append(function)
        function = getattr(function, "__wrapped__", None)
    return tuple(found)


def _rebind(namespace: dict[str, Any], name: str, function: object) -> None:
    """Set a module's global (one place, for the tests to refuse it)."""
    namespace[name] = function


class _Patch:
    """The process-wide wrappers of torch's clip functions, installed while some listener is attached.

    Wrappers are made per function replaced: over torch's own function a norm clip measures and clips in one
    pass (:func:`clip_and_stage`); over anything else (a wrapper another library or the user installed
    before the telemetry attached) the telemetries measure just before it and it does the clip, so whatever
    it does besides still happens, and the norm clip's factor comes from the total it returns.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()  # a listener's weakref callback may run inside add() (a collection)
        self._listeners: list[weakref.ref[ClipListener]] = []
        self._originals: dict[str, Callable[..., Any]] = {}
        self._wrappers: dict[str, Callable[..., Any]] = {}
        self._made: dict[tuple[str, int], tuple[Callable[..., Any], Callable[..., Any]]] = {}
        self._rebound: list[tuple[Callable[[], Any], str, Callable[..., Any], Callable[..., Any]]] = []
        self._inside = threading.local()  # a wrapper measuring on this thread: one nested in it passes through

    def add(self, listener: ClipListener) -> _PatchHandle:
        with self._lock:
            if not self._listeners:
                self._install()
            ref = weakref.ref(listener, self._remove)  # a listener collected unclosed detaches too
            self._listeners.append(ref)
            self._rebind_bound()
        return _PatchHandle(self, ref)

    def _remove(self, ref: weakref.ref[ClipListener]) -> None:
        with self._lock:
            if ref not in self._listeners:
                return
            self._listeners.remove(ref)
            if not self._listeners:
                self._uninstall()

    def listeners_of(self, params: list[torch.Tensor]) -> list[ClipListener]:
        if not params or getattr(self._inside, "clip", False):
            return []
        first = id(params[0])
        takers = []
        for ref in list(self._listeners):
            listener = ref()
            if listener is not None and listener.takes_clip(first):
                takers.append(listener)
        return takers

    def _wrapper(self, name: str, replaced: Callable[..., Any]) -> Callable[..., Any]:
        """The one wrapper of ``replaced``: torch's ``name``, or what was at ``torch.nn.utils.<name>``."""
        made = self._made.get((name, id(replaced)))
        if made is not None and made[0] is replaced:
            return made[1]
        own = any(replaced is function for function in torch_own(name))
        if name == "clip_grad_norm_":
            wrapper = self._torch_norm(replaced) if own else self._foreign_norm(replaced)
        else:
            wrapper = self._torch_value(replaced) if own else self._foreign_value(replaced)
        self._made[(name, id(replaced))] = (replaced, wrapper)
        _OURS[wrapper] = replaced
        return wrapper

    def _measuring(self) -> _Measuring:
        return _Measuring(self._inside)

    def _torch_norm(self, norm: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        @functools.wraps(norm)
        def clip_grad_norm_(
            parameters: Parameters,
            max_norm: float,
            norm_type: float = 2.0,
            error_if_nonfinite: bool = False,
            foreach: bool | None = None,
        ) -> torch.Tensor:
            params = _listed(parameters)
            listeners = self.listeners_of(params)
            if not listeners:
                total: torch.Tensor = norm(
                    params, max_norm, norm_type=norm_type, error_if_nonfinite=error_if_nonfinite, foreach=foreach
                )
                return total
            with self._measuring():
                return clip_and_stage(params, max_norm, norm_type, error_if_nonfinite, foreach, listeners, norm)

        return clip_grad_norm_

    def _torch_value(self, value: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(value)
        def clip_grad_value_(parameters: Parameters, clip_value: float, foreach: bool | None = None) -> None:
            params = _listed(parameters)
            listeners = self.listeners_of(params)
            if not listeners:
                value(params, clip_value, foreach=foreach)
            else:
                with self._measuring():
                    _measure_then(listeners, lambda: value(params, clip_value, foreach=foreach), None, params)

        return clip_grad_value_

    def _foreign_norm(self, foreign: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(foreign)
        def clip_grad_norm_(parameters: Parameters, *args: Any, **kwargs: Any) -> Any:
            params = _listed(parameters)
            given = parameters if isinstance(parameters, torch.Tensor) else params  # a generator is spent
            listeners = self.listeners_of(params)
            if not listeners:
                return foreign(given, *args, **kwargs)
            max_norm = args[0] if args else kwargs.get("max_norm")
            with self._measuring():
                return _measure_then(listeners, lambda: foreign(given, *args, **kwargs), max_norm, params)

        return clip_grad_norm_

    def _foreign_value(self, foreign: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(foreign)
        def clip_grad_value_(parameters: Parameters, *args: Any, **kwargs: Any) -> Any:
            params = _listed(parameters)
            given = parameters if isinstance(parameters, torch.Tensor) else params
            listeners = self.listeners_of(params)
            if not listeners:
                return foreign(given, *args, **kwargs)
            with self._measuring():
                return _measure_then(listeners, lambda: foreign(given, *args, **kwargs), None, params, factor=False)

        return clip_grad_value_

    def _install(self) -> None:
        utils: Any = torch.nn.utils
        self._originals = {name: getattr(utils, name) for name in _NAMES}
        self._made = {}
        self._wrappers = {name: self._wrapper(name, _looked_through(found)) for name, found in self._originals.items()}
        for name, wrapper in self._wrappers.items():
            setattr(utils, name, wrapper)

    def _rebind_bound(self) -> None:
        """Modules that bound torch's clip functions under their own name before the patch (``from torch.nn.utils
        import clip_grad_norm_`` at the top of a script, ``__main__``): their names are the wrappers while
        attached, restored at the last detach (module docstring, "Clips bound at import")."""
        targets = {id(function): (name, function) for name in _NAMES for function in torch_own(name)}
        # Once per attach, over every module's globals (some 30 ms for 3500 modules with Lightning and transformers
        # imported): the loops allocate nothing the cyclic collector tracks, so the scan does not set it off.
        for key, module in sys.modules.copy().items():
            if key in _SKIPPED or key.startswith(_SKIPPED_PREFIXES) or not isinstance(module, types.ModuleType):
                continue
            try:
                namespace = vars(module)
                for value in namespace.values():
                    if id(value) in targets:
                        break
                else:
                    continue
                hits = [(attr, targets[id(value)]) for attr, value in namespace.items() if id(value) in targets]
            except Exception:  # noqa: BLE001 - changed while read (another thread's import), or an odd namespace
                continue
            self._rebind_module(key, module, namespace, hits)

    def _rebind_module(
        self,
        key: str,
        module: types.ModuleType,
        namespace: dict[str, Any],
        hits: list[tuple[str, tuple[str, Callable[..., Any]]]],
    ) -> None:
        rebound, refused = [], []
        for attr, (name, function) in hits:
            wrapper = self._wrapper(name, function)
            bound = name if attr == name else f"{name} (as {attr})"
            try:
                _rebind(namespace, attr, wrapper)
            except Exception:  # noqa: BLE001 - named in a warning below, with the way out
                refused.append((bound, name))
                continue
            try:
                owner: Callable[[], Any] = weakref.ref(module)
            except TypeError:
                owner = functools.partial(lambda held: held, module)
            self._rebound.append((owner, attr, function, wrapper))
            rebound.append(bound)
        if rebound and ("rebound", key) not in _announced:
            _announced.add(("rebound", key))
            _logger.info(
                "tolaria_otel: module %s bound torch's %s before the telemetry attached: while attached that name "
                "is the package's wrapper, so its clips are measured before clipping; restored at detach",
                key,
                ", ".join(rebound),
            )
        if refused and ("refused", key) not in _announced:
            _announced.add(("refused", key))
            _logger.warning(
                "tolaria_otel: module %s bound torch's %s before the telemetry attached, and the package cannot "
                "rebind it: its clips are measured after clipping. Call %s through the module attribute instead%s",
                key,
                ", ".join(bound for bound, _ in refused),
                " or ".join(sorted({f"torch.nn.utils.{name}(...)" for _, name in refused})),
                ", or telemetry.clip_grad_norm_(...)" if any(name == "clip_grad_norm_" for _, name in refused) else "",
            )

    def _uninstall(self) -> None:
        utils: Any = torch.nn.utils
        for name, wrapper in self._wrappers.items():
            if getattr(utils, name) is wrapper:
                setattr(utils, name, self._originals[name])
            else:  # patched over since: restoring would drop the other patch; ours passes through
                _logger.debug("tolaria_otel: torch.nn.utils.%s was patched over; leaving it", name)
        for owner, attr, function, wrapper in self._rebound:
            module = owner()
            if module is None:
                continue
            namespace = vars(module)
            if namespace.get(attr) is wrapper:
                namespace[attr] = function
            else:  # the module set that name since: its own choice stays; ours passes through
                _logger.debug("tolaria_otel: %s.%s was set since the patch; leaving it", module.__name__, attr)
        self._rebound = []
        self._made = {}


def _looked_through(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function``, or what it calls where it is a wrapper of the patch's (left in place, patched over since)."""
    seen = 0
    while function in _OURS and seen < 16:
        function = _OURS[function]
        seen += 1
    return function


class _Measuring:
    """While a wrapper measures a clip on this thread, a wrapper nested in it (the one it replaced, a module's
    name rebound to one) passes through: one clip, measured once."""

    def __init__(self, inside: threading.local) -> None:
        self._inside = inside

    def __enter__(self) -> None:
        self._inside.clip = True

    def __exit__(self, *exc: object) -> None:
        self._inside.clip = False


class _PatchHandle:
    """``remove()`` detaches one listener (idempotent); the last one restores torch's functions."""

    def __init__(self, patch: _Patch, ref: weakref.ref[ClipListener]) -> None:
        self._patch = patch
        self._ref = ref

    def remove(self) -> None:
        self._patch._remove(self._ref)


_PATCH = _Patch()


def attach_clip_patch(listener: ClipListener) -> _PatchHandle:
    """Route torch's clip functions through ``listener`` until ``handle.remove()`` (module docstring)."""
    return _PATCH.add(listener)


def unreachable_clip(model: nn.Module, *, deepspeed: bool = False) -> str | None:
    """Why the package would see only clipped gradients of ``model``, with the way out; None when it would not."""
    names = {cls.__name__ for cls in type(model).__mro__}
    if deepspeed or "DeepSpeedEngine" in names:
        return (
            "DeepSpeed clips inside its engine (its gradient_clipping setting), out of the package's reach: "
            "the values are measured after clipping. Set gradient_clipping to 0 in the DeepSpeed config "
            "to measure the gradients before any clip"
        )
    if any(type(module).__name__ == "FullyShardedDataParallel" for module in model.modules()):
        return (
            "FSDP1 clips with model.clip_grad_norm_, out of the package's reach: the values are measured "
            "after clipping. Shard with fully_shard (FSDP2), whose gradients torch.nn.utils.clip_grad_norm_ "
            "clips where the package measures them first, or do not clip"
        )
    return None


_warned: set[str] = set()


def warn_unreachable_clip(model: nn.Module, *, deepspeed: bool = False) -> None:
    """Say once per process and cause when the clip of ``model`` cannot be reached."""
    reason = unreachable_clip(model, deepspeed=deepspeed)
    if reason is not None and reason not in _warned:
        _warned.add(reason)
        _logger.warning("tolaria_otel: %s", reason)
