"""Faults through the real Collector (collector/otel-collector-store.yaml into VictoriaMetrics), each a test:

- the Collector down at the trainer's start;
- the Collector killed (SIGKILL) mid-run and restarted on the same ports;
- the store down behind a live Collector;
- a hung Collector (SIGSTOP: the kernel still accepts connections, nothing answers).

For each: no exception reaches the training loop (every epoch runs and returns its summary), exports resume
when the part is back (the latest epoch's top-K arrives), what is lost is exactly what docs/operations.md ("When
the Collector (or the store) is down") says, and with OTEL_EXPORTER_OTLP_TIMEOUT=2 ``telemetry.close()`` and
``provider.shutdown()`` return within a few seconds while the fault lasts. Each epoch's values are distinct
floats, so the raw samples in the store say which epochs arrived.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.stack import (
    STORE_COLLECTOR_CONFIG,
    Collector,
    VictoriaMetrics,
    collector_binary,
    victoria_metrics,
    wait_until,
)
from tolaria_otel import EpochSummary

from .pipeline_run import Run, as_layers, current_top_k, expected_layers, export_to, run_env

pytestmark = pytest.mark.backend

PROTOCOLS = ("http/protobuf", "grpc")
OTLP_TIMEOUT_S = 2  # run_env's OTEL_EXPORTER_OTLP_TIMEOUT
#: "Within a few seconds": an export in flight and the final one, each bounded by the OTLP timeout, and a margin
#: for a loaded machine.
TEARDOWN_BOUND_S = 2 * OTLP_TIMEOUT_S + 2.0
#: How long the latest epoch may take to arrive once the part is back (export interval, batch timeout, the
#: Collector's retry interval of at most 5 s, store ingestion), with a wide margin for a loaded machine.
RESUME_TIMEOUT_S = 20.0


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VictoriaMetrics]:
    with victoria_metrics(tmp_path_factory.mktemp("store")) as server:
        yield server


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    return run_env(monkeypatch)


@pytest.fixture
def collector_for(tmp_path: Path) -> Iterator[type[Collector]]:
    """Collectors (not started) in front of a given store, every one stopped at the end of the test."""
    made: list[Collector] = []

    def make(store: VictoriaMetrics) -> Collector:
        collector = Collector(
            collector_binary(),
            tmp_path / f"otelcol-{len(made)}",
            [STORE_COLLECTOR_CONFIG],
            env={"OTELCOL_STORE_OTLP_ENDPOINT": store.otlp_metrics_url},
        )
        made.append(collector)
        return collector

    yield make  # type: ignore[misc]
    for collector in made:
        collector.stop()


def new_run(env: pytest.MonkeyPatch, collector: Collector, protocol: str = "http/protobuf") -> Run:
    instance = f"fault-{uuid.uuid4().hex[:8]}"
    export_to(env, collector.otlp_endpoints[protocol], instance, protocol)
    return Run(instance)


def values(*summaries: EpochSummary) -> set[float]:
    return {value for summary in summaries for value in expected_layers(summary).values()}


def stored(store: VictoriaMetrics, run: Run) -> set[float]:
    """Every layer_norm value the store holds for this run, at any time."""
    match = f'tolaria_grad_agg_seed_layer_norm{{service_instance_id="{run.instance}"}}'
    return {value for series in store.export(match) for value in series["values"]}


def within(some: set[float], others: set[float]) -> bool:
    """Every value of ``some`` is one of ``others``, as VictoriaMetrics keeps them (12 significant digits)."""
    return all(any(math.isclose(value, other, rel_tol=1e-10) for other in others) for value in some)


def overlap(some: set[float], others: set[float]) -> bool:
    return any(within({value}, others) for value in some)


def arrives(store: VictoriaMetrics, run: Run, summary: EpochSummary) -> None:
    """The epoch is the current top-K in the store (exports resumed)."""
    selector = f'{{service_instance_id="{run.instance}"}}'
    expected = expected_layers(summary)
    wait_until(
        lambda: as_layers(store.query(current_top_k(selector))) == pytest.approx(expected, rel=1e-12),
        timeout=RESUME_TIMEOUT_S,
        message=f"epoch {summary.epoch} did not arrive in the store",
    )


def settled(run: Run) -> None:
    """Wait until no export of an earlier epoch is still retrying: the reader exports one at a time, so once a
    flush of the latest epoch has failed (within the OTLP timeout), every earlier attempt is over. Without it,
    an export still retrying when the Collector comes back delivers its epoch late (docs/operations.md)."""
    run.provider.force_flush(10_000)  # True or False: the export it made is over either way


def close_within_bound(run: Run, fault: str) -> None:
    close_s, shutdown_s = run.close()
    print(
        f"\n{fault}: telemetry.close() {close_s:.2f}s, provider.shutdown() {shutdown_s:.2f}s "
        f"(OTEL_EXPORTER_OTLP_TIMEOUT={OTLP_TIMEOUT_S}, bound {TEARDOWN_BOUND_S:.0f}s)"
    )
    assert close_s + shutdown_s < TEARDOWN_BOUND_S


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_collector_down_at_the_trainers_start(env, store, collector_for, protocol):
    collector = collector_for(store)
    run = new_run(env, collector, protocol)
    superseded = run.epoch()  # nothing listens: every export of this epoch fails, and the next epoch replaces it
    latest = run.epoch()
    settled(run)
    collector.start()
    arrives(store, run, latest)
    assert not overlap(values(superseded), stored(store, run)), "an epoch superseded while it was down arrived"
    arrives(store, run, run.epoch())
    collector.stop()
    close_within_bound(run, f"Collector down ({protocol})")


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_collector_killed_mid_run_and_restarted(env, store, collector_for, protocol):
    collector = collector_for(store)
    collector.start()
    run = new_run(env, collector, protocol)
    before = run.epoch()
    arrives(store, run, before)
    collector.kill()  # SIGKILL: what it held (repeats of `before`, already stored) is gone with it
    superseded = run.epoch()
    latest = run.epoch()
    settled(run)
    collector.start()  # same ports
    arrives(store, run, latest)
    assert within(values(before), stored(store, run))
    assert not overlap(values(superseded), stored(store, run)), "an epoch superseded while it was down arrived"
    collector.kill()
    close_within_bound(run, f"Collector killed ({protocol})")


def test_store_down_behind_a_live_collector_loses_nothing(env, collector_for, tmp_path):
    with victoria_metrics(tmp_path / "own-store") as own_store:
        collector = collector_for(own_store)
        collector.start()
        run = new_run(env, collector)
        epochs = [run.epoch()]
        arrives(own_store, run, epochs[0])
        own_store.stop()
        for _ in range(2):
            epochs.append(run.epoch())
            # The Collector accepted the epoch (into its retry queue): the trainer's export succeeded.
            assert run.provider.force_flush(10_000)
        own_store.start()  # same port and data
        arrives(own_store, run, epochs[-1])
        # Every epoch is in the store, those of the outage late but with their own timestamps.
        wait_until(
            lambda: within(values(*epochs), stored(own_store, run)),
            timeout=RESUME_TIMEOUT_S,
            message="an epoch exported while the store was down never arrived",
        )
        own_store.stop()
        close_within_bound(run, "store down behind the Collector")


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_hung_collector(env, store, collector_for, protocol):
    collector = collector_for(store)
    collector.start()
    run = new_run(env, collector, protocol)
    epochs = [run.epoch()]
    arrives(store, run, epochs[0])
    collector.hang()
    epochs += [run.epoch(), run.epoch()]  # each export waits for the timeout on the exporter's thread, not here
    collector.resume()
    arrives(store, run, epochs[-1])
    # Requests the hung Collector's kernel had accepted may still be processed when it resumes, so the middle
    # epoch may arrive late; nothing else can (docs/operations.md).
    assert within(stored(store, run), values(*epochs))
    assert within(values(epochs[0]), stored(store, run))
    collector.hang()
    close_within_bound(run, f"Collector hung ({protocol})")
