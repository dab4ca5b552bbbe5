"""close() never waits on the network; provider.shutdown() waits at most about one OTLP timeout,
with the collector refusing or hung, with the SDK's default timeout and the recommended one
(docs/operations.md, "Stopping"). Each case in a fresh process, all four side by side."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from benchmarks.teardown import CASES, measure

pytestmark = pytest.mark.slow

#: The Python SDK's OTLP timeout when OTEL_EXPORTER_OTLP_TIMEOUT is unset, in seconds.
DEFAULT_TIMEOUT_S = 10.0
# Each upper bound is what the case would take without the behaviour it checks, not a guess at a machine's
# slack: what is timed here is mostly waiting on a socket or a backoff, and load only adds to the little CPU
# work around those waits. The SDK's export retries a refused connection after 1, 2, 4 s (each +-20 %) while
# they fit in the timeout, and waits the whole timeout on a hung collector.
#: close() making the final export itself would wait at least the first backoff (1 s less 20 %) against the
#: refusing collector, the whole timeout against the hung one. Measured: 0.000 s.
CLOSE_BOUND_S = 0.8
#: shutdown() with OTEL_EXPORTER_OTLP_TIMEOUT=2 ignored would run the default timeout's course: backoffs of at
#: least 0.8 + 1.6 + 3.2 = 5.6 s against the refusing collector, 10 s against the hung one (measured with it:
#: 0.8 to 1.2 s and 2.0 s). With the default timeout, one export more than the final one would take twice the
#: timeout (measured: 6 to 8.4 s and 10 s).
SHUTDOWN_BOUND_S = {"2": 5.6, None: 2 * DEFAULT_TIMEOUT_S}


def test_close_is_immediate_and_shutdown_is_bounded_by_the_otlp_timeout():
    with ThreadPoolExecutor(len(CASES)) as pool:
        results = dict(zip(CASES, pool.map(lambda case: measure(*case), CASES)))
    for (mode, timeout, each_epoch), result in results.items():
        assert result["close_s"] < CLOSE_BOUND_S, (mode, timeout, result)  # no I/O in close()
        # With the epoch's export under way when the provider shuts down, shutdown waits for it (the SDK's export
        # lock) before its own final one, which still carries the last epoch: one OTLP timeout more at most.
        in_flight_s = (DEFAULT_TIMEOUT_S if timeout is None else float(timeout)) if each_epoch else 0.0
        assert result["shutdown_s"] < SHUTDOWN_BOUND_S[timeout] + in_flight_s, (mode, timeout, result)
    # Lower bounds, which load cannot break: the hung collector holds the export for the whole timeout, so the
    # timeout is what bounds it, and OTEL_EXPORTER_OTLP_TIMEOUT is read in seconds as docs/operations.md says
    # (read as milliseconds, 2 would give up after 2 ms).
    assert results[("hung", None, False)]["shutdown_s"] >= 0.95 * DEFAULT_TIMEOUT_S
    assert results[("hung", "2", False)]["shutdown_s"] >= 0.95 * 2
