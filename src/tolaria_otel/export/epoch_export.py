"""Every epoch reaches the exporter: an export started off the training thread at each epoch end.

The instruments are gauges of the latest epoch, read at each collection; at the SDK's default export
interval (60 s) an application whose epochs are shorter would export only some of them. So, on a provider
that pushes (an SDK ``MeterProvider`` with a ``PeriodicExportingMetricReader``), each epoch end asks for
``provider.force_flush()`` on a thread of its own: the epoch end only sets a flag (and starts the thread
when none runs), so neither the step nor ``end_epoch()`` ever waits on the network; requests that come
while an export is in flight are coalesced into one more export after it, which carries the latest
epoch. The thread is not a daemon: the interpreter's exit waits for an export under way (at most one
OTLP timeout, as the provider's shutdown would), so the last epoch is not cut off mid-request; a
trainer closed after its epoch's export does not send that epoch again at the shutdown.
``SeedLayerTelemetry(export_each_epoch=False)`` leaves the exports to the reader's interval.

In pull mode (only Prometheus readers) nothing can be pushed: an epoch the scrape did not read is gone,
and the instruments say so once (``ProviderStreams``). Other readers (an ``InMemoryMetricReader``, none)
are collected when the application asks: no export is started for them.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable
from typing import Any

from .sdk_state import provider_readers, provider_shut_down

_logger = logging.getLogger("tolaria_otel.telemetry")

_thread = threading.local()


def on_export_thread() -> bool:
    """Whether this code runs in an epoch's export (a collection the package started)."""
    return getattr(_thread, "exporting", False) is True


#: How a provider's points leave the process, which decides whether an epoch end starts an export.
PUSH, PULL, MANUAL = "push", "pull", "manual"


def delivery(provider: Any) -> str:
    """``push`` (a periodic exporting reader, or an SDK provider whose readers are not known: flushing is
    its public API), ``pull`` (Prometheus readers only) or ``manual`` (no reader that exports by itself)."""
    try:
        from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    except ImportError:  # the API alone: no SDK provider
        return MANUAL
    if not isinstance(provider, SdkMeterProvider):
        return MANUAL  # the API's no-op or proxy provider: nothing is collected
    readers = provider_readers(provider)
    if readers is None:
        return PUSH
    if any(isinstance(reader, PeriodicExportingMetricReader) for reader in readers):
        return PUSH
    pull = [r for r in readers if any(base.__name__ == "PrometheusMetricReader" for base in type(r).__mro__)]
    return PULL if pull else MANUAL


class EpochExport:
    """Exports of one provider started at epoch ends, one at a time, on a thread of their own."""

    def __init__(self, provider: Any, done: Callable[[], None]) -> None:
        self._provider = weakref.ref(provider)  # the provider outlives nothing of the package's
        self._done = done  # called after each export returns
        self._lock = threading.Lock()
        self._running = False
        self._pending = False
        self._warned = False
        #: Exports made (for tests and benchmarks: how many epoch ends were coalesced).
        self.exports = 0

    @property
    def idle(self) -> bool:
        with self._lock:
            return not self._running

    def request(self) -> None:
        """Ask for an export of the latest snapshot; returns at once."""
        with self._lock:
            if self._running:
                self._pending = True  # the running export makes one more after it
                return
            self._running = True
            self._pending = True
        try:
            threading.Thread(target=self._run, name="tolaria-otel-epoch-export", daemon=False).start()
        except RuntimeError:  # no new thread (the interpreter is shutting down): the interval's export remains
            with self._lock:
                self._running = False
            self._warn_once("tolaria_otel: could not start the epoch's export thread; the reader's interval exports")

    def _run(self) -> None:
        _thread.exporting = True
        while True:
            with self._lock:
                if not self._pending:
                    self._running = False
                    return
                self._pending = False
            provider = self._provider()
            if provider is None or provider_shut_down(provider):
                continue  # its shutdown made the final export
            try:
                provider.force_flush()
                self.exports += 1
                self._done()
            except Exception:  # noqa: BLE001  # never raised into anything: the interval's export remains
                self._warn_once("tolaria_otel: an epoch's export failed; the reader's interval exports", True)
            del provider

    def _warn_once(self, message: str, exc_info: bool = False) -> None:
        level = logging.DEBUG if self._warned else logging.WARNING
        self._warned = True
        _logger.log(level, message, exc_info=exc_info)
