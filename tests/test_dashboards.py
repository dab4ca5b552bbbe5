"""The Grafana dashboards (dashboards/) and the PNG plot, proven against real data.

Every PromQL expression is parsed by a real PromQL parser (``promql-parser``, the Rust
``promql-parser`` crate that GreptimeDB uses) after substituting the template variables as
Grafana does, then run against a real VictoriaMetrics fed over OTLP/HTTP by short real training
runs: a healthy one, in which the alarm panels must be empty, and one with a NaN, an exploding, a
vanishing, a not-measured, a spiking and a noisy seed, in which they must not be. Both runs measure the
host (the seed-to-host ratio) and set no trainer identity (``env_id``): the Trainer variable's All must
still show them. Several trainers in one process are tests/test_trainers_live.py.
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
import re
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import torch
import yaml
from matplotlib.image import imread

from dashboards import generate, seed_layers
from devtools.stack import VictoriaMetrics, backend_binaries, prometheus, victoria_metrics, wait_until
from tolaria_otel import EpochSummary, SeedLayerSettings, SeedLayerTelemetry, configure_meter_provider
from tolaria_otel.cli import main as cli_main
from tolaria_otel.cli.plot import load_summaries, render
from tolaria_otel.config.histogram import HISTOGRAM_BOUNDARIES, STEP_NORM_BOUNDARIES
from tolaria_otel.demo.seeded_mlp import Seed
from tolaria_otel.summary import health

from .helpers import export_each_flush, seeded_network, train_epoch

pytestmark = pytest.mark.backend

REPO = Path(__file__).resolve().parents[1]
DASHBOARD_FILE = REPO / "dashboards" / "json" / "tolaria-seed-layers.json"
DATASOURCE_PROVISIONING = REPO / "dashboards" / "provisioning" / "datasources" / "tolaria.yml"
DASHBOARD_PROVISIONING = REPO / "dashboards" / "provisioning" / "dashboards" / "tolaria.yml"
RULES_FILE = REPO / "collector" / "rules" / "tolaria-seed-layers.rules.yml"
#: The exported histogram buckets of the runs here: the default resolution's.
BOUNDARIES = STEP_NORM_BOUNDARIES[SeedLayerSettings().step_norm_histogram]

TOP_K = 2
SEEDS = ("seed-0", "seed-1", "seed-2", "seed-3", "seed-4", "seed-5")
EPOCHS = 4
STEPS = 3
#: The last epoch is long: with N sampled steps max/RMS is at most sqrt(N), so a spike above 10x the RMS
#: needs more than 100 steps, and a p99 that is not simply the largest step needs 100 too.
LAST_EPOCH_STEPS = 200
# The stages as Kasmina names them (canonical, prefixed) in the healthy run; the faulty run uses the
# unprefixed form, which the dashboards accept too.
STAGE_PREFIX = {False: "SEED_STAGE_", True: ""}
STAGE_CHANGE = ("seed-1", 2, "BLENDING")  # seed-1 moves from TRAINING to BLENDING at epoch 2
# The faulty run's last epoch: seed-0's gradients are x1e8 at every step, seed-1 gets a NaN at the last
# step, seed-3's module leaves the graph (no gradient at all), seed-4's gradient is x40 at the last step
# (a spike: max/RMS above 10, the RMS only a few times up, so no exploding layer). From the first step:
# seed-2's gradients are x1e-12, and every third step seed-5's are x100 (noisy: p99 far above 10x p50,
# max/RMS below 10, and every epoch alike, so no exploding layer either).
EXPLODING, NONFINITE, VANISHING, NOT_MEASURED, SPIKE, NOISY = SEEDS
NONFINITE_LAYER = "net.2"
SPIKE_SCALE, NOISY_SCALE, NOISY_EVERY = 40.0, 100.0, 3

# What Grafana puts for its global variables (any valid value does for parsing and running).
GRAFANA_GLOBALS = {
    "__interval": "15s",
    "__rate_interval": "1m",
    "__range": "6h",
    "__range_s": "21600",
    "__interval_ms": "15000",
}
VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)")


# -- Grafana's variable interpolation for the Prometheus data source --------------------------------


def regex_escape(value: str) -> str:
    """Grafana's ``prometheusSpecialRegexEscape``: a multi/include-all value inside a regex matcher."""
    return re.sub(r"[$^*{}\[\]'+?.()|]", lambda m: "\\\\" + m.group(0), value.replace("\\", "\\\\\\\\"))


def variable_value(variable: dict[str, Any], selected: list[str] | str) -> str:
    """How Grafana's Prometheus data source writes ``selected`` into a query (``interpolateQueryExpr``)."""
    if selected == "$__all":
        return variable["allValue"]
    values = [selected] if isinstance(selected, str) else selected
    if not variable.get("multi") and not variable.get("includeAll"):
        return values[0].replace("\\", "\\\\").replace("'", "\\\\'")
    escaped = [regex_escape(v) for v in values]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


def interpolate(expr: str, values: dict[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        name = next(g for g in match.groups() if g)
        if name in values:
            return values[name]
        if name in GRAFANA_GLOBALS:
            return GRAFANA_GLOBALS[name]
        raise AssertionError(f"{expr!r} uses ${name}, which is no variable of the dashboard")

    return VARIABLE.sub(replace, expr)


def display_name(panel: dict[str, Any], target: dict[str, Any], labels: dict[str, str]) -> str:
    """The series name Grafana shows: the legend format rendered (``renderLegendFormat``: a missing
    label renders as its own name), then the panel's ``renameByRegex`` transformations (the regex
    anchored, as ``stringToJsRegex`` does with a pattern not written ``/.../``)."""
    name = re.sub(r"\{\{\s*(.+?)\s*\}\}", lambda m: labels.get(m.group(1)) or m.group(1), target["legendFormat"])
    for transformation in panel.get("transformations", []):
        if transformation["id"] == "renameByRegex":
            options = transformation["options"]
            js_group = re.sub(r"\$(\d)", r"\\\1", options["renamePattern"])
            name = re.sub(f"^(?:{options['regex']})$", js_group, name)
    return name


# -- the dashboard ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD_FILE.read_text(encoding="utf-8"))


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out += panel.get("panels", [])
    return out


def targets(dashboard: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(panel, target) for panel in panels(dashboard) for target in panel.get("targets", [])]


def variables(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dashboard["templating"]["list"]}


def label_values_query(variable: dict[str, Any]) -> tuple[str, str]:
    match = re.fullmatch(r"label_values\((.*), (\w+)\)", variable["query"]["query"], re.DOTALL)
    assert match, variable["query"]
    return match.group(1), match.group(2)


def all_expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, expression) for every query, variable selector and annotation."""
    exprs = [(f"panel {p['id']} {t['refId']}", t["expr"]) for p, t in targets(dashboard)]
    exprs += [
        (f"variable {name}", label_values_query(v)[0])
        for name, v in variables(dashboard).items()
        if v["type"] == "query"
    ]
    exprs += [(f"annotation {a['name']}", a["expr"]) for a in dashboard["annotations"]["list"]]
    return exprs


def test_committed_json_is_what_the_generator_makes() -> None:
    rendered = generate.rendered()
    assert sorted(rendered) == sorted(p.name for p in DASHBOARD_FILE.parent.glob("*.json"))
    for name, text in rendered.items():
        assert (DASHBOARD_FILE.parent / name).read_text(encoding="utf-8") == text, f"run `make dashboards` ({name})"
    assert generate.main(["--check"]) == 0


def test_dashboard_is_valid_grafana_json(dashboard: dict[str, Any]) -> None:
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    assert dashboard["uid"] == "tolaria-seed-layers" and dashboard["title"]
    assert dashboard["time"] == {"from": "now-6h", "to": "now"} and dashboard["refresh"] == "1m"
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) and i > 0 for i in ids)
    assert sorted(ids) == list(range(1, 15))  # stable ids: a new panel gets a new number, never a reused one
    bound = {"type": "prometheus", "uid": "${datasource}"}
    for panel in panels(dashboard):
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        if panel["type"] == "row":
            assert panel["collapsed"] is False and panel["panels"] == []
            continue
        assert panel["datasource"] == bound, panel["title"]
        assert panel["targets"] and all(t["datasource"] == bound for t in panel["targets"]), panel["title"]
        assert len(panel["description"]) > 60, panel["title"]
        assert panel["fieldConfig"]["defaults"]["unit"], panel["title"]
    for annotation in dashboard["annotations"]["list"]:
        assert annotation["datasource"] == bound
    names = variables(dashboard)
    assert list(names) == ["datasource", "env_id", "seed_id", "stage", "top_k"]
    assert names["datasource"]["type"] == "datasource" and names["datasource"]["query"] == "prometheus"
    for name in ("env_id", "seed_id", "stage", "top_k"):
        assert names[name]["type"] == "query" and names[name]["datasource"] == bound
    for name in ("env_id", "seed_id"):
        assert names[name]["multi"] and names[name]["includeAll"] and names[name]["allValue"] == ".*"
    repeated = [p for p in panels(dashboard) if p.get("repeat")]
    assert [(p["id"], p["repeat"]) for p in repeated] == [(9, "seed_id")]


def test_provisioning_matches_the_dashboard(dashboard: dict[str, Any]) -> None:
    datasources = yaml.safe_load(DATASOURCE_PROVISIONING.read_text())["datasources"]
    assert [(d["uid"], d["type"], d["name"]) for d in datasources] == [
        (seed_layers.DATASOURCE_UID, "prometheus", seed_layers.DATASOURCE_NAME)
    ]
    assert variables(dashboard)["datasource"]["current"]["value"] == seed_layers.DATASOURCE_UID
    (provider,) = yaml.safe_load(DASHBOARD_PROVISIONING.read_text())["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/var/lib/grafana/dashboards")


def test_every_expression_parses_with_a_real_promql_parser(dashboard: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        promql_parser.parse("max by (seed_id) (")  # the parser is real: it rejects what Prometheus rejects
    vars_ = variables(dashboard)
    selections: list[dict[str, str | list[str]]] = [  # the ways Grafana fills the variables in
        {"env_id": "$__all", "seed_id": "$__all", "stage": "$__all"},
        {"env_id": ["0", "3"], "seed_id": ["seed-0", "seed-2"], "stage": ["SEED_STAGE_TRAINING", "BLENDING"]},
        {"env_id": "2", "seed_id": "seed-1", "stage": "$__all"},  # a repeated panel's own seed
    ]
    for selection in selections:
        values = {name: variable_value(vars_[name], chosen) for name, chosen in selection.items()}
        values["top_k"] = variable_value(vars_["top_k"], "3")
        values["datasource"] = seed_layers.DATASOURCE_UID
        for where, expr in all_expressions(dashboard):
            promql = interpolate(expr, values)
            assert "$" not in promql, (where, promql)
            try:
                promql_parser.parse(promql)
            except ValueError as error:
                pytest.fail(f"{where}: {promql!r} does not parse: {error}")


# -- real runs into real VictoriaMetrics ------------------------------------------------------------


@dataclass
class Backend:
    """The query API of a store holding a run's series (VictoriaMetrics or Prometheus), and the time range
    the run spans."""

    url: str
    started: float
    ended: float

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as response:
            payload = json.loads(response.read())
        assert payload["status"] == "success", payload
        return payload["data"]

    def run_target(self, target: dict[str, Any], promql: str) -> list[dict[str, Any]]:
        """The query as Grafana sends it: instant for a table, otherwise a range over the run.

        The time range ends at ``self.ended``, a whole second after every export and already past
        (VictoriaMetrics aligns a range to its step and answers points in the future partly). The
        run lasts a few seconds, so the step is 1 s, what Grafana picks for so short a range.
        """
        end = self.ended
        if target.get("instant"):
            return list(self.api("/api/v1/query", query=promql, time=f"{end:.3f}")["result"])
        start = end - math.ceil(end - self.started + 1)  # whole steps, so the last one is at ``end``
        data = self.api("/api/v1/query_range", query=promql, start=f"{start:.3f}", end=f"{end:.3f}", step="1s")
        return list(data["result"])

    def label_values(self, label: str, selector: str) -> list[str]:
        """What Grafana's ``label_values(selector, label)`` asks the data source."""
        return list(
            self.api(
                f"/api/v1/label/{label}/values",
                **{"match[]": selector},
                start=f"{self.started - 1:.0f}",
                end=f"{self.ended + 1:.0f}",
            )
        )


#: Every per-seed metric a run exports (the histogram by its buckets and count).
PER_SEED_METRICS = (
    *seed_layers.SEED_FAMILY_NAMES,
    seed_layers.SEED_NORM_MAX,
    seed_layers.SEED_HOST_RATIO,
    seed_layers.SEED_STEP_NORM_BUCKET,
    seed_layers.SEED_STEP_NORM_COUNT,
)


def settle(vm: VictoriaMetrics, series: int) -> float:
    """Wait until ``series`` per-seed series are searchable (VictoriaMetrics makes a new series searchable
    a few seconds after it arrives, even after its force_flush), and the budget gauge; return the end of
    the run's time range: a whole second after every export, and already past."""
    every = f'{{__name__=~"{"|".join(PER_SEED_METRICS)}"}}'
    wait_until(lambda: len(vm.series(every)) == series, timeout=20, message=f"the run's {series} series not searchable")
    wait_until(
        lambda: len(vm.series(seed_layers.SERIES_BUDGET)) > 0,
        timeout=20,
        message="the run's series budget gauge not searchable",
    )
    ended = math.ceil(time.time())
    wait_until(lambda: time.time() > ended + 0.05, timeout=2, message="clock")
    return ended


def exported_series(summaries: list[EpochSummary]) -> set[tuple[str, str, str, str | None]]:
    """The per-seed series (``PER_SEED_METRICS``) a run's summaries export: (metric, seed, stage, layer,
    bucket or None)."""

    def finite(value: float | None) -> bool:
        return value is not None and math.isfinite(value)

    series: set[tuple[str, str, str, str | None]] = set()  # (metric, seed, stage, layer or bucket)
    for summary in summaries:
        for seed in summary.seeds.values():
            if seed.total_norm is None:
                series.add(("not_measured", seed.seed_id, seed.stage, None))
                continue
            for metric, value in (
                ("norm", seed.total_norm),
                ("norm_max", seed.max_norm),
                ("host_ratio", seed.host_ratio),
            ):
                if finite(value):
                    series.add((metric, seed.seed_id, seed.stage, None))
            for layer, value in seed.top_layers:
                series.add(("layer_norm" if math.isfinite(value) else "nonfinite", seed.seed_id, seed.stage, layer))
            if sum(seed.step_norm_counts):  # the histogram: every bucket (+Inf too) and the count
                series |= {("bucket", seed.seed_id, seed.stage, str(b)) for b in range(len(BOUNDARIES) + 1)}
                series.add(("count", seed.seed_id, seed.stage, None))
    return series


@dataclass
class Run(Backend):
    summaries: list[EpochSummary]
    faulty: bool


def train_into(vm: VictoriaMetrics, faulty: bool) -> Run:
    """A real training run exporting over OTLP/HTTP, one export per epoch end, measuring the host."""
    model, kasmina = seeded_network(len(SEEDS))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(7)
    started = time.time()
    with pytest.MonkeyPatch.context() as env:
        export_each_flush(env, vm.otlp_metrics_url, "tolaria-dashboards-test", TOP_K)
        env.setenv("TOLARIA_SEED_HOST_NORM", "true")
        settings = SeedLayerSettings.from_env()
        provider = configure_meter_provider(settings)
    for seed_id in SEEDS:
        kasmina.stages[seed_id] = STAGE_PREFIX[faulty] + "TRAINING"
    telemetry = SeedLayerTelemetry(model, kasmina, settings=settings, meter_provider=provider)
    telemetry.attach(optimizer)
    step = 0
    last_epoch_from = (EPOCHS - 1) * STEPS + 1
    last_step = last_epoch_from + LAST_EPOCH_STEPS - 1

    def inject_faults() -> None:  # runs before optimizer.step(), so before the telemetry's post-hook
        nonlocal step
        step += 1
        scale = {VANISHING: 1e-12, NOISY: NOISY_SCALE if step % NOISY_EVERY == 0 else 1.0}
        if step >= last_epoch_from:
            scale[EXPLODING] = 1e8
        if step == last_step:
            scale[SPIKE] = SPIKE_SCALE
        for seed_id, factor in scale.items():
            for parameter in kasmina.modules[seed_id].parameters():
                parameter.grad.mul_(factor)
        if step == last_step:  # the NaN reaches the parameters only after the last forward pass
            grad = kasmina.modules[NONFINITE].get_parameter("net.2.weight").grad  # typed, unlike .net[2].weight
            assert grad is not None  # every seed is in the graph until the last epoch: backward filled it
            grad[0, 0] = float("nan")

    summaries: list[EpochSummary] = []
    try:
        for epoch in range(EPOCHS):
            if epoch == STAGE_CHANGE[1]:
                kasmina.stages[STAGE_CHANGE[0]] = STAGE_PREFIX[faulty] + STAGE_CHANGE[2]
            if faulty and epoch == EPOCHS - 1:
                culled = kasmina.modules[NOT_MEASURED]
                assert isinstance(culled, Seed)  # the registry holds nn.Module; seeded_network grafts Seeds
                culled.in_graph = False
            steps = LAST_EPOCH_STEPS if epoch == EPOCHS - 1 else STEPS
            train_epoch(
                model, optimizer, steps=steps, generator=generator, before_step=inject_faults if faulty else None
            )
            summary = telemetry.end_epoch()
            assert summary is not None  # the telemetry is on (from_env with the exporter set)
            summaries.append(summary)
            assert provider.force_flush(10_000)
    finally:
        telemetry.close()
        provider.shutdown()
    return Run(vm.url, started, settle(vm, len(exported_series(summaries))), summaries, faulty)


#: Prometheus' fixed 5 min lookback. VictoriaMetrics otherwise infers a series' lookback from its
#: sample interval, which in these runs (an export every few hundred ms) is a second or two, so the
#: answer would depend on how long the test takes; at the real 60 s export interval it is minutes.
VM_ARGS = ["-search.minStalenessInterval=5m", "-search.maxStalenessInterval=5m"]


@pytest.fixture(scope="module")
def healthy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    with victoria_metrics(tmp_path_factory.mktemp("vm-healthy"), extra_args=VM_ARGS) as vm:
        yield train_into(vm, faulty=False)


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    with victoria_metrics(tmp_path_factory.mktemp("vm-faulty"), extra_args=VM_ARGS) as vm:
        yield train_into(vm, faulty=True)


def test_the_faulty_run_is_what_the_panels_must_catch(healthy: Run, faulty: Run) -> None:
    for summary in healthy.summaries:
        for seed in summary.seeds.values():
            assert all(seed_layers.VANISHING_BELOW < v < seed_layers.EXPLODING_ABSOLUTE for _, v in seed.top_layers)
    last = faulty.summaries[-1].seeds
    assert last[NOT_MEASURED].total_norm is None and last[NOT_MEASURED].top_layers == ()
    assert all(s.measured for s in faulty.summaries[-2].seeds.values())  # it was measured the epoch before
    assert last[NONFINITE].nonfinite_layers == (NONFINITE_LAYER,)
    assert last[EXPLODING].top_layers[0][1] > seed_layers.EXPLODING_ABSOLUTE
    assert last[VANISHING].top_layers[0][1] < seed_layers.VANISHING_BELOW


#: Per (panel id, refId): the labels of every result series, and whether the healthy / faulty runs
#: must return data. A panel added without an entry here fails the test below.
EXPECTED: dict[tuple[int, str], tuple[set[str], bool, bool]] = {
    (1, "A"): ({"seed_id", "stage", "layer"}, False, True),  # non-finite
    (2, "A"): ({"seed_id", "stage", "layer"}, False, True),  # exploding, absolute
    (2, "B"): ({"seed_id", "stage", "layer"}, False, True),  # exploding, against the median
    (3, "A"): ({"seed_id", "stage"}, False, True),  # vanishing
    (10, "A"): ({"seed_id", "stage"}, False, True),  # not measured
    (4, "A"): ({"seed_id", "stage", "layer"}, True, True),  # latest top-K table
    (4, "B"): ({"seed_id", "stage", "layer"}, True, True),  # latest top-K table: the largest step
    (5, "A"): ({"seed_id"}, True, True),  # stage timeline
    (6, "A"): ({"seed_id"}, True, True),  # per-seed totals
    (7, "A"): (set(), True, True),  # series count
    (7, "B"): (set(), True, True),  # budget
    (7, "C"): (set(), True, True),  # series count of the latest export
    (9, "A"): ({"seed_id", "layer"}, True, True),  # repeated per seed
    (11, "A"): ({"seed_id"}, True, True),  # per-step seed norm, p50
    (11, "B"): ({"seed_id"}, True, True),  # per-step seed norm, p99
    (12, "A"): ({"seed_id"}, True, True),  # spikes: max / RMS
    (13, "A"): ({"seed_id"}, True, True),  # seed-to-host ratio
    (14, "A"): (set(), False, False),  # share of steps clipped: neither run clips (tests/test_clipping.py does)
    (14, "B"): (set(), False, False),  # smallest clip factor
    (14, "C"): ({"seed_id"}, False, False),  # per seed clipped on its own: its smallest factor
}


def dashboard_values(
    backend: Backend, dashboard: dict[str, Any], seed_id: list[str] | str = "$__all", env_id: list[str] | str = "$__all"
) -> dict[str, str]:
    vars_ = variables(dashboard)
    values = {
        "datasource": seed_layers.DATASOURCE_UID,
        "env_id": variable_value(vars_["env_id"], env_id),
        "seed_id": variable_value(vars_["seed_id"], seed_id),
        "stage": variable_value(vars_["stage"], "$__all"),
    }
    top_k = backend.label_values("top_k", interpolate(label_values_query(vars_["top_k"])[0], values))
    return {**values, "top_k": variable_value(vars_["top_k"], max(top_k, key=int))}


def panel_target(dashboard: dict[str, Any], panel_id: int, ref_id: str = "A") -> tuple[dict[str, Any], dict[str, Any]]:
    (found,) = [(p, t) for p, t in targets(dashboard) if p["id"] == panel_id and t["refId"] == ref_id]
    return found


def metric_series(result: list[dict[str, Any]], seed_id: str | None = None) -> dict[tuple, dict[str, str]]:
    return {
        tuple(sorted(r["metric"].items())): r["metric"]
        for r in result
        if seed_id is None or r["metric"].get("seed_id") == seed_id
    }


@pytest.mark.parametrize("which", ["healthy", "faulty"])
def test_every_panel_query_returns_what_it_should(
    request: pytest.FixtureRequest, dashboard: dict[str, Any], which: str
) -> None:
    run: Run = request.getfixturevalue(which)
    assert sorted((p["id"], t["refId"]) for p, t in targets(dashboard)) == sorted(EXPECTED)
    for seed_selection in ("$__all", list(SEEDS)):
        values = dashboard_values(run, dashboard, seed_selection)
        for panel, target in targets(dashboard):
            labels, in_healthy, in_faulty = EXPECTED[(panel["id"], target["refId"])]
            where = f"{which} run, panel {panel['id']} {panel['title']!r} {target['refId']}"
            repeats = (
                [(s, variable_value(variables(dashboard)["seed_id"], s)) for s in SEEDS]
                if panel.get("repeat")
                else [(None, values["seed_id"])]
            )
            for seed, seed_value in repeats:
                result = run.run_target(target, interpolate(target["expr"], {**values, "seed_id": seed_value}))
                if not (in_faulty if run.faulty else in_healthy):
                    assert result == [], f"{where}: must be empty, got {result}"
                    continue
                if run.faulty and seed == NOT_MEASURED:  # its latest export has no layer: none at the end
                    assert all(r["values"][-1][0] < run.ended for r in result), f"{where}: {result}"
                    continue
                assert result, f"{where}: no data"
                assert all(set(r["metric"]) == labels for r in result), f"{where}: labels {result}"
                if panel.get("repeat"):
                    assert {r["metric"]["seed_id"] for r in result} == {seed_value}, where
                if target.get("legendFormat", "__auto") != "__auto":  # no trainer label: no trainer in the name
                    assert all(not display_name(panel, target, r["metric"]).startswith("env_id") for r in result), where
    check_values(run, dashboard)


def check_values(run: Run, dashboard: dict[str, Any]) -> None:
    """The numbers behind the panels: the table is the last epoch's top-K, the budget (the trainer's own
    gauge) is top_k x seeds."""
    by_id = {(p["id"], t["refId"]): t for p, t in targets(dashboard)}
    values = dashboard_values(run, dashboard)
    last = run.summaries[-1]

    table = run.run_target(by_id[(4, "A")], interpolate(by_id[(4, "A")]["expr"], values))
    got = {(r["metric"]["seed_id"], r["metric"]["stage"], r["metric"]["layer"]): float(r["value"][1]) for r in table}
    want = {(s.seed_id, s.stage, layer): value for s in last.seeds.values() for layer, value in s.top_layers}
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == (math.inf if not math.isfinite(value) else pytest.approx(value, rel=1e-6)), key
    largest = run.run_target(by_id[(4, "B")], interpolate(by_id[(4, "B")]["expr"], values))
    got_max = {
        (r["metric"]["seed_id"], r["metric"]["stage"], r["metric"]["layer"]): float(r["value"][1]) for r in largest
    }
    want_max = {
        (s.seed_id, s.stage, layer): s.layer_max[layer]
        for s in last.seeds.values()
        for layer, value in s.top_layers
        if math.isfinite(value)
    }  # a NaN layer has no largest step
    assert got_max == pytest.approx(want_max, rel=1e-9)
    assert all(got_max[key] >= got[key] * (1 - 1e-9) for key in got_max)  # the largest step is at least the RMS

    stages = run.run_target(by_id[(5, "A")], interpolate(by_id[(5, "A")]["expr"], values))
    code = {r["metric"]["seed_id"]: r["values"][-1][1] for r in stages}
    stage_names = {s: last.seeds[s].stage.removeprefix("SEED_STAGE_") for s in SEEDS}
    assert stage_names[STAGE_CHANGE[0]] == STAGE_CHANGE[2]
    assert code == {s: str(seed_layers.STAGES.index(name) + 1) for s, name in stage_names.items()}

    (budget,) = run.run_target(by_id[(7, "B")], interpolate(by_id[(7, "B")]["expr"], values))
    # Exactly the per-layer points the last epoch exports: a seed not measured exports none.
    assert budget["values"][-1][1] == str(sum(len(s.top_layers) for s in last.seeds.values()))
    (exported,) = run.run_target(by_id[(7, "C")], interpolate(by_id[(7, "C")]["expr"], values))
    measured = [s for s in last.seeds.values() if s.measured]
    assert exported["values"][-1][1] == str(TOP_K * len(measured))  # every seed here has more than top_k layers
    (stored,) = run.run_target(by_id[(7, "A")], interpolate(by_id[(7, "A")]["expr"], values))
    # Push has no staleness markers: seed-1's layers of its previous stage are still in the lookback.
    assert int(stored["values"][-1][1]) >= TOP_K * len(SEEDS) + TOP_K

    check_step_diagnostics(run, dashboard)
    if run.faulty:
        nonfinite = run.run_target(by_id[(1, "A")], interpolate(by_id[(1, "A")]["expr"], values))
        assert {(r["metric"]["seed_id"], r["metric"]["layer"]) for r in nonfinite} == {(NONFINITE, NONFINITE_LAYER)}
        for ref in ("A", "B"):
            exploding = run.run_target(by_id[(2, ref)], interpolate(by_id[(2, ref)]["expr"], values))
            assert {r["metric"]["seed_id"] for r in exploding} == {EXPLODING}, ref
        # The seed without gradients is not measured, not vanishing, though its layers of the epoch
        # before are still inside the lookback window.
        vanishing = run.run_target(by_id[(3, "A")], interpolate(by_id[(3, "A")]["expr"], values))
        assert {r["metric"]["seed_id"] for r in vanishing} == {VANISHING}
        unmeasured = run.run_target(by_id[(10, "A")], interpolate(by_id[(10, "A")]["expr"], values))
        assert {(r["metric"]["seed_id"], r["metric"]["stage"]) for r in unmeasured} == {(NOT_MEASURED, "TRAINING")}
        assert [v for _, v in unmeasured[0]["values"]][-1] == "1"
        earlier_layers = f'{seed_layers.LAYER_NORM}{{seed_id="{NOT_MEASURED}"}}'
        stored_layers = run.api("/api/v1/series", **{"match[]": earlier_layers})
        assert stored_layers, "the not-measured seed's earlier layers must be in the store for this check to mean much"


def at_end(run: Run, result: list[dict[str, Any]]) -> dict[str, float]:
    """Per seed, the value at the end of the run of a range query's series (none for a series that ended before)."""
    ends = {r["metric"]["seed_id"]: r["values"][-1] for r in result}
    return {seed_id: float(value) for seed_id, (at, value) in ends.items() if at == run.ended}


def quantile_bucket(steps: list[float], quantile: float) -> tuple[float, float]:
    """The bounds (lower, upper] of the exported bucket (``BOUNDARIES``; the last: above them) that holds the
    ``quantile`` of the steps (each recorded at the upper bound of its fine bucket), where histogram_quantile
    interpolates; a quantile in the last bucket is its lower bound (histogram_quantile's answer for +Inf)."""
    counts = [0] * (len(BOUNDARIES) + 1)
    for value in steps:
        counts[bisect.bisect_left(BOUNDARIES, value)] += 1
    rank = quantile * sum(counts)
    cumulative = itertools.accumulate(counts)
    index = next((i for i, total in enumerate(cumulative) if total >= rank), len(counts) - 1)
    if index == len(BOUNDARIES):
        return BOUNDARIES[-1], BOUNDARIES[-1]
    return (BOUNDARIES[index - 1] if index else 0.0), BOUNDARIES[index]


def decade(value: float) -> int:
    """The k of the decade bucket (10^(k-1), 10^k] that holds ``value``: the noisy alert's ceil(log10(q) - 1e-9)."""
    return math.ceil(math.log10(value) - 1e-9)


def check_step_diagnostics(run: Run, dashboard: dict[str, Any]) -> None:
    """The per-step panels against the in-process summaries: the quantiles in the buckets the run's step
    counts put them in, max/RMS and the host ratio of the last epoch; the spiking and the noisy seed, and
    only they, cross the alerts' factors."""
    values = dashboard_values(run, dashboard)
    last = run.summaries[-1].seeds
    # The run lasts seconds: the window holds every epoch, so every step of the seed, whatever its stage.
    fine_bounds = (*HISTOGRAM_BOUNDARIES, HISTOGRAM_BOUNDARIES[-1] * 2)  # where the package records each fine count
    steps = {
        s: [
            bound
            for e in run.summaries
            if e.seeds[s].measured
            for bound, count in zip(fine_bounds, e.seeds[s].step_norm_counts)
            for _ in range(count)
        ]
        for s in SEEDS
    }
    quantiles = {}
    for ref, quantile in (("A", 0.5), ("B", 0.99)):
        _, target = panel_target(dashboard, 11, ref)
        quantiles[quantile] = got = at_end(run, run.run_target(target, interpolate(target["expr"], values)))
        assert got.keys() == set(SEEDS), (ref, got)
        for seed_id, value in got.items():
            lower, upper = quantile_bucket(steps[seed_id], quantile)
            assert lower < value <= upper or lower == value == upper, (ref, seed_id, value, lower, upper)
    spread = {s: decade(quantiles[0.99][s]) - decade(quantiles[0.5][s]) for s in SEEDS}
    assert {s for s, apart in spread.items() if apart >= seed_layers.NOISY_DECADES} == (
        {NOISY} if run.faulty else set()
    )

    _, target = panel_target(dashboard, 12)
    spikes = at_end(run, run.run_target(target, interpolate(target["expr"], values)))
    finite = [s for s in last.values() if s.total_norm is not None and math.isfinite(s.total_norm)]  # measured
    largest_over_rms = {}
    for s in finite:
        assert s.max_norm is not None and s.total_norm is not None  # a measured seed has both
        largest_over_rms[s.seed_id] = s.max_norm / s.total_norm
    assert spikes == pytest.approx(largest_over_rms, rel=1e-9)
    assert {s for s, ratio in spikes.items() if ratio > health.SPIKE_ABOVE} == ({SPIKE} if run.faulty else set())

    _, target = panel_target(dashboard, 13)
    ratios = at_end(run, run.run_target(target, interpolate(target["expr"], values)))
    assert ratios == pytest.approx({s.seed_id: s.host_ratio for s in finite}, rel=1e-9)


def openmetrics(backend: Backend) -> str:
    """Every tolaria sample the backend holds, as OpenMetrics text (one family after another)."""

    def escape(value: str) -> str:
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    families: dict[str, list[str]] = {}
    query = urllib.parse.urlencode({"match[]": '{__name__=~"tolaria_.*"}'})
    url = f"{backend.url}/api/v1/export?{query}"
    with urllib.request.urlopen(url, timeout=10) as response:
        for line in response.read().decode().splitlines():
            series = json.loads(line)
            name = series["metric"].pop("__name__")
            labels = ",".join(f'{k}="{escape(v)}"' for k, v in sorted(series["metric"].items()))
            families.setdefault(name, []).extend(
                f"{name}{{{labels}}} {value!r} {ms / 1000:.3f}"
                for value, ms in zip(series["values"], series["timestamps"])
            )
    text = "".join(f"# TYPE {name} gauge\n" + "\n".join(samples) + "\n" for name, samples in families.items())
    return text + "# EOF\n"


@pytest.fixture(scope="module")
def faulty_in_prometheus(faulty: Run, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    """The faulty run's samples copied into a real Prometheus 2.53 (``promtool tsdb create-blocks-from``).

    Prometheus' engine is stricter than VictoriaMetrics': a function that drops the metric name may not
    leave two series with the same labels ("vector cannot contain metrics with the same labelset").
    The faulty run has such pairs in the lookback window: seed-1's net.2 as layer_norm then
    layer_nonfinite, seed-3 as seed_norm then not_measured, each in one stage.
    """
    tmp = tmp_path_factory.mktemp("prometheus-faulty")
    (tmp / "run.om").write_text(openmetrics(faulty))
    data = tmp / "prometheus" / "prometheus-data"
    created = subprocess.run(
        [backend_binaries().promtool, "tsdb", "create-blocks-from", "openmetrics", str(tmp / "run.om"), str(data)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert created.returncode == 0, created.stdout + created.stderr
    with prometheus("global: {}\n", tmp / "prometheus") as server:
        yield Backend(server.url, faulty.started, faulty.ended)


def test_every_panel_query_answers_the_same_on_prometheus(
    faulty: Run, faulty_in_prometheus: Backend, dashboard: dict[str, Any]
) -> None:
    def series(result: list[dict[str, Any]]) -> list[str]:
        return sorted(json.dumps(r["metric"], sort_keys=True) for r in result)

    assert faulty_in_prometheus.api("/api/v1/series", **{"match[]": f"{{{seed_layers.SEED_FAMILY}}}"})
    values = dashboard_values(faulty, dashboard)
    for panel, target in targets(dashboard):
        where = f"panel {panel['id']} {panel['title']!r} {target['refId']}"
        promql = interpolate(target["expr"], values)
        try:
            in_prometheus = faulty_in_prometheus.run_target(target, promql)
        except urllib.error.HTTPError as error:
            pytest.fail(f"{where}: Prometheus rejects it: {error.read().decode(errors='replace')}")
        in_victoria = faulty.run_target(target, promql)
        assert series(in_prometheus) == series(in_victoria), where
        if target.get("instant"):
            got = {json.dumps(r["metric"], sort_keys=True): float(r["value"][1]) for r in in_prometheus}
            want = {json.dumps(r["metric"], sort_keys=True): float(r["value"][1]) for r in in_victoria}
            assert got == pytest.approx(want), where


def test_spike_and_noisy_alerts_catch_their_seeds_on_the_runs(
    healthy: Run, faulty: Run, faulty_in_prometheus: Backend
) -> None:
    """The conditions of TolariaSeedGradientSpike and TolariaSeedGradientNoisy (their `for` aside, which
    promtool tests) on the runs' real series: in the faulty run exactly the spiking and the noisy seed, on
    VictoriaMetrics and on Prometheus (whose increase() extrapolates); nothing in the healthy run."""
    rules = {
        rule["alert"]: rule["expr"]
        for group in yaml.safe_load(RULES_FILE.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }
    for alert, seed_id in (("TolariaSeedGradientSpike", SPIKE), ("TolariaSeedGradientNoisy", NOISY)):
        for run, backend, want in (
            (healthy, healthy, set()),
            (faulty, faulty, {seed_id}),
            (faulty, faulty_in_prometheus, {seed_id}),
        ):
            result = backend.api("/api/v1/query", query=rules[alert], time=f"{run.ended:.3f}")["result"]
            assert {r["metric"]["seed_id"] for r in result} == want, (alert, backend.url, result)


def test_choosing_seeds_narrows_every_per_seed_panel_to_them(healthy: Run, dashboard: dict[str, Any]) -> None:
    """Two seeds chosen in the Seed drop-down (a multi-value selection, as Grafana writes it into the
    queries): every panel that shows seeds shows those two and no other."""
    chosen = [SEEDS[0], SEEDS[2]]
    values = dashboard_values(healthy, dashboard, chosen)
    for panel, target in targets(dashboard):
        labels, in_healthy, _ = EXPECTED[(panel["id"], target["refId"])]
        if "seed_id" not in labels or not in_healthy:
            continue
        result = healthy.run_target(target, interpolate(target["expr"], values))
        where = f"panel {panel['id']} {panel['title']!r} {target['refId']}"
        assert {r["metric"]["seed_id"] for r in result} == set(chosen), where


def test_stage_change_annotation_returns_the_run_stages(healthy: Run, dashboard: dict[str, Any]) -> None:
    (annotation,) = dashboard["annotations"]["list"]
    promql = interpolate(annotation["expr"], dashboard_values(healthy, dashboard))
    result = healthy.run_target({}, promql)
    assert all(set(r["metric"]) == {"seed_id", "stage"} for r in result)
    pairs = {(r["metric"]["seed_id"], r["metric"]["stage"]) for r in result}
    assert (STAGE_CHANGE[0], "SEED_STAGE_" + STAGE_CHANGE[2]) in pairs and {s for s, _ in pairs} == set(SEEDS)


def test_variables_return_the_run_seeds_stages_and_top_k(healthy: Run, dashboard: dict[str, Any]) -> None:
    vars_ = variables(dashboard)
    trainer_selector, label = label_values_query(vars_["env_id"])
    assert healthy.label_values(label, interpolate(trainer_selector, {})) == []  # the run sets no env_id
    every_trainer = {"env_id": variable_value(vars_["env_id"], "$__all")}  # ... and All still matches it
    seed_selector, label = label_values_query(vars_["seed_id"])
    assert sorted(healthy.label_values(label, interpolate(seed_selector, every_trainer))) == list(SEEDS)
    stage_selector, label = label_values_query(vars_["stage"])
    training, blending = "SEED_STAGE_TRAINING", "SEED_STAGE_BLENDING"
    for chosen, stages in (
        ("$__all", {training, blending}),
        ("seed-0", {training}),
        (["seed-0", "seed-1"], {training, blending}),
    ):
        selector = interpolate(stage_selector, {**every_trainer, "seed_id": variable_value(vars_["seed_id"], chosen)})
        assert set(healthy.label_values(label, selector)) == stages, chosen
    top_k_selector, label = label_values_query(vars_["top_k"])
    assert healthy.label_values(label, interpolate(top_k_selector, every_trainer)) == [str(TOP_K)]


# -- the alert rules agree with the dashboard's thresholds ------------------------------------------


def numbers_and_ranges(expr: str) -> tuple[set[float], set[str]]:
    """Every number literal and range/offset duration in a PromQL expression."""
    text = str(promql_parser.parse(expr))
    numbers = {float(n) for n in re.findall(r"(?<![\w.])(\d+(?:\.\d+)?(?:e[+-]?\d+)?)(?![\w.\]])", text)}
    ranges = set(re.findall(r"\[(\w+)\]", text))
    return numbers, ranges


def test_thresholds_agree_with_the_alert_rules() -> None:
    alerts = [
        rule for group in yaml.safe_load(RULES_FILE.read_text())["groups"] for rule in group["rules"] if "alert" in rule
    ]
    rules = {rule["alert"]: rule["expr"] for rule in alerts}
    durations = {rule["alert"]: rule["for"] for rule in alerts}
    numbers, ranges = numbers_and_ranges(rules["TolariaSeedLayerGradientExploding"])
    assert {
        seed_layers.EXPLODING_ABSOLUTE,
        seed_layers.EXPLODING_FACTOR,
        seed_layers.EXPLODING_RELATIVE_FLOOR,
    } <= numbers
    assert seed_layers.EXPLODING_BASELINE in ranges
    assert seed_layers.NONFINITE_VALUE in numbers_and_ranges(rules["TolariaSeedLayerNonFinite"])[0]
    assert seed_layers.LAYER_NONFINITE in rules["TolariaSeedLayerNonFinite"]
    vanishing = rules["TolariaSeedGradientVanishing"]
    assert seed_layers.VANISHING_BELOW in numbers_and_ranges(vanishing)[0]
    assert "|".join(seed_layers.VANISHING_EXEMPT_STAGES) in vanishing
    not_measured = rules["TolariaSeedNotMeasured"]
    assert seed_layers.SEED_NOT_MEASURED in not_measured
    assert f'stage!~"(SEED_STAGE_)?({"|".join(seed_layers.NOT_MEASURED_EXEMPT_STAGES)})"' in not_measured
    assert f'stage!~"(SEED_STAGE_)?({"|".join(seed_layers.VANISHING_EXEMPT_STAGES)})"' in vanishing
    assert durations["TolariaSeedNotMeasured"] == seed_layers.NOT_MEASURED_FOR
    numbers = numbers_and_ranges(rules["TolariaSeedGradientSpike"])[0]
    assert {health.SPIKE_ABOVE, seed_layers.EXPLODING_RELATIVE_FLOOR} <= numbers
    assert seed_layers.SEED_NORM_MAX in rules["TolariaSeedGradientSpike"]
    assert durations["TolariaSeedGradientSpike"] == seed_layers.SPIKE_FOR
    numbers, ranges = numbers_and_ranges(rules["TolariaSeedGradientNoisy"])
    noisy = {0.99, 0.5, seed_layers.NOISY_DECADES, seed_layers.NOISY_MIN_STEPS, seed_layers.EXPLODING_RELATIVE_FLOOR}
    assert noisy <= numbers
    assert ranges == {seed_layers.NOISY_WINDOW}
    assert durations["TolariaSeedGradientNoisy"] == seed_layers.NOISY_FOR
    for name in (seed_layers.SEED_STEP_NORM_BUCKET, seed_layers.SEED_STEP_NORM_COUNT):
        assert name in rules["TolariaSeedGradientNoisy"]


def test_thresholds_agree_with_the_in_process_health_states() -> None:
    """Tamiyo's health classification (summary.health) and the dashboard's thresholds are the same numbers."""
    assert seed_layers.EXPLODING_ABSOLUTE == health.EXPLODING_ABOVE
    assert seed_layers.VANISHING_BELOW == health.VANISHING_BELOW
    # The dashboard module's own binding: it imports health's without re-exporting it (no __all__).
    assert vars(seed_layers)["SPIKE_ABOVE"] == health.SPIKE_ABOVE


# -- the PNG ----------------------------------------------------------------------------------------


def assert_not_blank(png: Path) -> None:
    pixels = imread(png)
    assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 200
    assert pixels[..., :3].std() > 0.05  # a blank (or single-colour) image has ~0
    assert (pixels[..., :3].mean(axis=2) < 0.5).mean() > 0.005  # some dark ink: axes, text, lines


def test_plot_renders_the_in_process_summaries(faulty: Run, tmp_path: Path) -> None:
    out = render(faulty.summaries, tmp_path / "run.png")
    assert out == tmp_path / "run.png"
    assert_not_blank(out)


def test_plot_renders_a_json_lines_file(healthy: Run, faulty: Run, tmp_path: Path, capsys) -> None:
    run_file = tmp_path / "run.jsonl"
    run_file.write_text("".join(json.dumps(s.to_dict()) + "\n" for s in faulty.summaries))
    loaded = load_summaries(run_file)
    assert [s.to_dict() for s in loaded] == [s.to_dict() for s in faulty.summaries]
    nonfinite = loaded[-1].seeds[NONFINITE].total_norm
    assert nonfinite is not None and math.isnan(nonfinite)
    assert cli_main(["plot", str(run_file), "-o", str(tmp_path / "out.png")]) == 0  # python -m tolaria_otel.plot
    assert capsys.readouterr().out.strip() == str(tmp_path / "out.png")
    assert_not_blank(tmp_path / "out.png")
    (tmp_path / "bad.jsonl").write_text('{"epoch": 0}\n')
    assert cli_main(["plot", str(tmp_path / "bad.jsonl")]) == 2
    assert "bad.jsonl:1: not an EpochSummary" in capsys.readouterr().err
