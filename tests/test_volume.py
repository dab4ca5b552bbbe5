"""Volume as a contract (issue 18.4): the series one trainer creates, counted in the real stores.

Trainers with S seeds of L layers, one per setting below, export over OTLP/HTTP (the real exporter) into a
real VictoriaMetrics (``-opentelemetry.usePrometheusNaming``, as the store path runs it), and a real
Prometheus federates them from there with collector/prometheus-store.yml. Each store's count of each
trainer's series, per metric name, must equal ``volume.trainer_series``: the function ``tolaria-otel doctor``
prints and docs/operations.md's "Volume" table is written from (the last test checks the table against it).
Run with ``-s`` to see the counts.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from benchmarks import capacity
from devtools.stack import (
    Prometheus,
    VictoriaMetrics,
    prometheus,
    store_prometheus_config,
    victoria_metrics,
    wait_until,
)
from tolaria_otel import SeedLayerSettings, SeedLayerTelemetry, configure_meter_provider
from tolaria_otel.export.volume import per_seed, trainer_series

from .helpers import export_each_flush

pytestmark = pytest.mark.backend

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 2  # a steady second epoch adds no series


@dataclass(frozen=True)
class Case:
    name: str
    seeds: int
    layers: int
    env: tuple[tuple[str, str], ...] = ()

    @property
    def service(self) -> str:
        return f"volume-{self.name}"


CASES = (
    Case("coarse", 4, 3),  # the defaults with the prototype's 4 seeds of 3 layers
    Case("fine", 4, 3, (("TOLARIA_SEED_STEP_NORM_HISTOGRAM", "fine"),)),
    Case("off", 4, 3, (("TOLARIA_SEED_STEP_NORM_HISTOGRAM", "off"),)),
    Case("compact-host", 2, 5, (("TOLARIA_SEED_HEALTH_COMPACT", "true"), ("TOLARIA_SEED_HOST_NORM", "true"))),
    Case("few-layers", 3, 2, (("TOLARIA_SEED_LAYER_TOPK", "5"),)),  # fewer layers than top_k
    Case("max-seeds", 5, 4, (("TOLARIA_SEED_LAYER_MAX_SEEDS", "3"),)),  # two seeds left out
)


def settings_of(case: Case) -> SeedLayerSettings:
    return SeedLayerSettings.from_env({"TOLARIA_SEED_LAYER_SUMMARIES_ENABLED": "true", **dict(case.env)})


def train(case: Case, metrics_url: str) -> None:
    """A host layer and ``case.seeds`` seeds of ``case.layers`` Linear layers; every gradient its own value."""
    torch.manual_seed(0)
    model = nn.Module()
    model.host = nn.Linear(2, 2)
    model.seeds = nn.ModuleDict(
        {f"seed-{i}": nn.Sequential(*(nn.Linear(2, 2) for _ in range(case.layers))) for i in range(case.seeds)}
    )
    with pytest.MonkeyPatch.context() as env:
        export_each_flush(env, metrics_url, case.service, 3)
        for name, value in case.env:
            env.setenv(name, value)
        settings = SeedLayerSettings.from_env()
        assert settings == settings_of(case)  # what expected() counts for
        provider = configure_meter_provider(settings)
    telemetry = SeedLayerTelemetry(
        model,
        {seed_id: (module, "TRAINING") for seed_id, module in model.seeds.items()},
        settings=settings,
        meter_provider=provider,
    )
    for parameter in model.parameters():  # the same every epoch: the top-K stays, as does every series
        parameter.grad = torch.rand_like(parameter)
    try:
        for _ in range(EPOCHS):
            telemetry.observe_step()
            telemetry.end_epoch()
            assert provider.force_flush(10_000)
    finally:
        telemetry.close()
        provider.shutdown()


@dataclass
class Stores:
    vm: VictoriaMetrics
    prometheus: Prometheus


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stores]:
    with victoria_metrics(tmp_path_factory.mktemp("vm-volume")) as vm:
        for case in CASES:
            train(case, vm.otlp_metrics_url)
        with prometheus(
            store_prometheus_config(vm.url, interval="1s"), tmp_path_factory.mktemp("prom-volume")
        ) as nissa:
            yield Stores(vm, nissa)


def expected(case: Case) -> dict[str, int]:
    return trainer_series(settings_of(case), case.seeds, case.layers)


def vm_counts(vm: VictoriaMetrics, case: Case) -> Counter[str]:
    return Counter(
        series["__name__"] for series in vm.series(f'{{__name__=~"tolaria_.+", service_name="{case.service}"}}')
    )


def prometheus_counts(nissa: Prometheus, case: Case) -> Counter[str]:
    # The federation job's relabelling makes service_name the job, as on the contrib path.
    result = nissa.query(f'count by (__name__) ({{__name__=~"tolaria_.+", job="{case.service}"}})')
    return Counter({item["metric"]["__name__"]: int(item["value"][1]) for item in result})


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_series_in_victoria_metrics_are_the_counted_ones(stores: Stores, case: Case) -> None:
    want = expected(case)
    got = wait_until(
        lambda: (counts := vm_counts(stores.vm, case)) == want and counts,
        timeout=20,
        message=f"{case.name}: {dict(vm_counts(stores.vm, case))} in VictoriaMetrics, want {want}",
    )
    print(f"\n{case.name}: {case.seeds} seeds x {case.layers} layers: {sum(got.values())} series in VictoriaMetrics")


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_series_in_prometheus_are_the_counted_ones(stores: Stores, case: Case) -> None:
    want = expected(case)
    got = stores.prometheus.wait_for(
        lambda: (counts := prometheus_counts(stores.prometheus, case)) == want and counts,
        message=f"{case.name}: {dict(prometheus_counts(stores.prometheus, case))} in Prometheus, want {want}",
    )
    print(f"\n{case.name}: {case.seeds} seeds x {case.layers} layers: {sum(got.values())} series in Prometheus")


def test_the_operations_volume_table_is_the_counted_one() -> None:
    """docs/operations.md, "Volume": per seed and per trainer of 4 seeds of 3 layers, per resolution."""
    volume = (ROOT / "docs" / "operations.md").read_text().split("\n## Volume\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(coarse|fine|off)`[^|]*\|[^|]*\| (\d+) \| (\d+) \| (\d+) \|", volume, re.MULTILINE)
    assert {row[0] for row in rows} == {"coarse", "fine", "off"}
    for resolution, buckets, seed, trainer in rows:
        settings = SeedLayerSettings(enabled=True, step_norm_histogram=resolution)
        series = trainer_series(settings, 4, 3)
        histogram = sum(count for name, count in series.items() if "_step_norm_" in name) // 4
        assert (int(buckets), int(seed), int(trainer)) == (histogram, per_seed(settings, 3), sum(series.values()))


def test_the_capacity_table_is_the_command_output() -> None:
    """docs/operations.md, "Capacity planning", is `python -m benchmarks.capacity` at its defaults."""
    section = (ROOT / "docs" / "operations.md").read_text().split("\n## Capacity planning\n", 1)[1].split("\n## ", 1)[0]
    table = capacity.table(1000, 4, 4, 3, 3).split("\n\n", 1)[1]
    assert table in section


@pytest.mark.parametrize("resolution", ["coarse", "fine", "off"])
@pytest.mark.parametrize(("compact", "host"), [(False, False), (True, False), (False, True)])
def test_per_seed_and_per_trainer_add_up(resolution: str, compact: bool, host: bool) -> None:
    """The per-seed figure the docs give adds up to the counted trainer: seeds x per seed + the trainer's own."""
    for top_k, layers in ((1, 3), (3, 3), (7, 12), (3, 1)):
        settings = SeedLayerSettings(
            enabled=True, top_k=top_k, compact=compact, host_norm=host, step_norm_histogram=resolution
        )
        assert sum(trainer_series(settings, 5, layers).values()) == 5 * per_seed(settings, layers) + 2 + host
