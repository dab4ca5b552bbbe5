"""The "Seed layer gradients" Grafana dashboard, built with Grafana's ``grafana-foundation-sdk``.

Every query aggregates ``by`` the contract's labels (``seed_id``, ``stage``, ``layer``) and the
trainer identity ``env_id`` only, so a panel looks the same whether the series come from
VictoriaMetrics' OTLP receiver (resource attributes as labels, no ``job``/``instance``) or from
Prometheus scraping the collector (``job``, ``instance``), and several trainers of one process
(``SeedLayerTelemetry(..., attributes={"env_id": "3"})``) stay apart. A run without ``env_id``
works the same: an absent label matches the Trainer variable's All (``.*``) and ``by (env_id, ...)``
keeps nothing for it. No query needs a recording rule: VictoriaMetrics evaluates none.

Panel ids and the dashboard uid are fixed here, so provisioning updates the dashboard in place.
"""

from __future__ import annotations

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus as prom
from grafana_foundation_sdk.builders import statetimeline, table, timeseries
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as model
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

from tolaria_otel.summary.health import SPIKE_ABOVE

# The SDK needs Python 3.11: its enums are StrEnum. mypy checks at the package's 3.10, where StrEnum is unknown and the
# members read as plain str, so each enum argument below carries an ignore; unused ignores are errors, so the check
# names them for removal once it runs at 3.11.

UID = "tolaria-seed-layers"
TITLE = "Tolaria: seed layer gradients"

#: The provisioned data source (dashboards/provisioning/datasources/tolaria.yml); the default of
#: the ``datasource`` variable, which every panel and query is bound to.
DATASOURCE_UID = "tolaria-prometheus"
DATASOURCE_NAME = "Tolaria Prometheus"
DATASOURCE = model.DataSourceRef(type_val="prometheus", uid="${datasource}")

# Alert thresholds, the only place the dashboard states them. They must agree with the alert rules
# in collector/rules/tolaria-seed-layers.rules.yml (tests/test_dashboards.py checks that they do):
#   TolariaSeedLayerGradientExploding: a layer's norm > EXPLODING_ABSOLUTE, or
#       > EXPLODING_FACTOR x its median over EXPLODING_BASELINE and > EXPLODING_RELATIVE_FLOOR
#   TolariaSeedLayerNonFinite:         tolaria_grad_agg_seed_layer_nonfinite == NONFINITE_VALUE
#   TolariaSeedGradientVanishing:      a seed's largest layer norm < VANISHING_BELOW, outside the stages
#       VANISHING_EXEMPT_STAGES (with or without the SEED_STAGE_ prefix)
#   TolariaSeedNotMeasured:            tolaria_grad_agg_seed_not_measured == 1 for NOT_MEASURED_FOR, outside the
#       stages NOT_MEASURED_EXEMPT_STAGES (the same, and GERMINATED: Esper keeps a germinated seed out of the graph)
#   TolariaSeedGradientSpike:          a seed's norm_max / norm > SPIKE_ABOVE (summary.health's, the in-process
#       health state "exploding"), the step > EXPLODING_RELATIVE_FLOOR, for SPIKE_FOR
#   TolariaSeedGradientNoisy:          p99 of a seed's per-step norm over NOISY_WINDOW at least NOISY_DECADES decade
#       buckets above p50 (so above NOISY_FACTOR x p50), with at least NOISY_MIN_STEPS steps in the window and
#       p99 > EXPLODING_RELATIVE_FLOOR, for NOISY_FOR
EXPLODING_ABSOLUTE = 1000.0
EXPLODING_FACTOR = 10.0
EXPLODING_BASELINE = "1h"
EXPLODING_RELATIVE_FLOOR = 1e-3
NONFINITE_VALUE = 1
VANISHING_BELOW = 1e-6
VANISHING_EXEMPT_STAGES = ("DORMANT", "CULLED", "PRUNED", "EMBARGOED", "RESETTING", "TERMINATED")
NOT_MEASURED_EXEMPT_STAGES = ("GERMINATED", *VANISHING_EXEMPT_STAGES)
NOT_MEASURED_FOR = "15m"
SPIKE_FOR = "15m"
NOISY_WINDOW = "15m"
NOISY_DECADES = 2
#: What NOISY_DECADES promises of the exact quantiles: p99 above this many times p50.
NOISY_FACTOR = 10.0 ** (NOISY_DECADES - 1)
NOISY_MIN_STEPS = 100
NOISY_FOR = "30m"

LAYER_NORM = "tolaria_grad_agg_seed_layer_norm"
#: A top-K layer's largest per-step norm of the epoch (the layers ranked by RMS, as ``layer_norm``).
LAYER_NORM_MAX = "tolaria_grad_agg_seed_layer_norm_max"
LAYER_NONFINITE = "tolaria_grad_agg_seed_layer_nonfinite"
SEED_NORM = "tolaria_grad_agg_seed_norm"
#: A seed's largest per-step norm of the epoch, exported beside ``seed_norm`` (same labels and timestamp).
SEED_NORM_MAX = "tolaria_grad_agg_seed_norm_max"
#: The histogram of a seed's per-step norms: cumulative bucket counts (``le``) and the step count.
SEED_STEP_NORM_BUCKET = "tolaria_grad_agg_seed_step_norm_bucket"
SEED_STEP_NORM_COUNT = "tolaria_grad_agg_seed_step_norm_count"
#: Esper's gate, (seed norm / host norm) x sqrt(host params / seed params); only with TOLARIA_SEED_HOST_NORM=true.
SEED_HOST_RATIO = "tolaria_grad_agg_seed_host_ratio"
#: 1 for a seed that had no gradient at any sampled step of the epoch: it has no norm point at all.
SEED_NOT_MEASURED = "tolaria_grad_agg_seed_not_measured"
SETTINGS_INFO = "tolaria_grad_agg_seed_layer_info"
#: Per trainer, the per-layer series it may export now: top_k x active seeds (0 in compact mode).
SERIES_BUDGET = "tolaria_grad_agg_seed_layer_series_budget"
#: Per trainer, in epochs in which a gradient clip was seen: the sampled steps with a clip, those it scaled
#: down, and its smallest factor min(max_norm / (total + 1e-6), 1). The norms are measured before the clip.
CLIP_STEPS = "tolaria_grad_agg_clip_steps"
CLIPPED_STEPS = "tolaria_grad_agg_clip_clipped_steps"
MIN_CLIP_FACTOR = "tolaria_grad_agg_clip_min_factor"
#: Per seed clipped on its own (a clip of its parameters only, as Esper clips each seed): its own clip's facts.
SEED_CLIPPED_STEPS = "tolaria_grad_agg_seed_clip_clipped_steps"
SEED_MIN_CLIP_FACTOR = "tolaria_grad_agg_seed_clip_min_factor"
#: Every series that names a seed: a seed whose total is non-finite has no ``seed_norm`` point, a seed
#: not measured has only its ``not_measured`` point, and compact mode has no layer points, so no
#: single metric lists every seed.
SEED_FAMILY_NAMES = (SEED_NORM, LAYER_NORM, LAYER_NONFINITE, SEED_NOT_MEASURED)
SEED_FAMILY = f'__name__=~"{"|".join(SEED_FAMILY_NAMES)}"'

#: Kasmina's lifecycle stages (DESIGN.md), in lifecycle order, and Esper's today (``leyline.stages.SeedStage``:
#: HOLDING, PRUNED). Stages come in two spellings: Kasmina's protobuf names at the design commit, prefixed
#: (``SEED_STAGE_TRAINING``), and Esper's IntEnum names, unprefixed (``TRAINING``); every query accepts both.
#: The stage timeline shows them as numbers 1..n mapped back to names. Any other stage string shows as
#: ``OTHER_STAGE``.
STAGES = (
    "DORMANT",
    "GERMINATED",
    "TRAINING",
    "BLENDING",
    "SHADOWING",
    "PROBATIONARY",
    "HOLDING",
    "FOSSILIZED",
    "CULLED",
    "PRUNED",
    "EMBARGOED",
    "RESETTING",
    "TERMINATED",
)
OTHER_STAGE = 0
STAGE_COLORS = {
    "DORMANT": "#8e8e8e",
    "GERMINATED": "#8ab8ff",
    "TRAINING": "#3274d9",
    "BLENDING": "#b877d9",
    "SHADOWING": "#a352cc",
    "PROBATIONARY": "#ff9830",
    "HOLDING": "#ffb357",
    "FOSSILIZED": "#56a64b",
    "CULLED": "#e02f44",
    "PRUNED": "#f2495c",
    "EMBARGOED": "#c4162a",
    "RESETTING": "#fade2a",
    "TERMINATED": "#5a5a5a",
}

#: The trainer identity the dashboards split by: ``attributes={"env_id": ...}`` of SeedLayerTelemetry.
TRAINER = "env_id"
TRAINERS = f'{TRAINER}=~"${TRAINER}"'
SEEDS = f'{TRAINERS}, seed_id=~"$seed_id"'
SEEDS_STAGES = f'{SEEDS}, stage=~"$stage"'
#: Grafana's value for "All" in a regex matcher: every value, including those outside the list.
ALL = ".*"

VALUE_MEANING = (
    "The value is the RMS over the epoch's sampled optimizer steps of the gradient L2 norm, "
    "sqrt(mean_t ||g_t||^2); it changes once per epoch and every export repeats the latest epoch."
)
LAYER_MEANING = (
    "A layer's gradient norm at one step is the L2 norm over all gradient elements of that "
    "module's own parameters. " + VALUE_MEANING
)


#: Legends name the trainer when the series has one. Grafana writes a missing label's name in its
#: place (``{{env_id}}`` -> ``env_id``), so the legend starts with ``env_id={{env_id}} `` and the
#: transformation below removes what that renders to without the label.
TRAINER_LEGEND = f"{TRAINER}={{{{{TRAINER}}}}} "
NO_TRAINER_RENAME = model.DataTransformerConfig(
    id_val="renameByRegex", options={"regex": f"{TRAINER}={TRAINER} (.*)", "renamePattern": "$1"}
)


def _fmt(value: float) -> str:
    """A number as PromQL and the alert rules write it (1000, 1e-06)."""
    return f"{value:g}"


def family_timestamps(matchers: str) -> str:
    """The timestamp of every seed-family series that ``matchers`` select, tagged with its metric.

    ``timestamp()`` drops the metric name, and two metrics of the family can hold series with the
    same other labels (a seed's ``seed_norm`` and ``not_measured`` of one stage; a layer's
    ``layer_norm`` and ``layer_nonfinite``): Prometheus rejects such a result ("vector cannot
    contain metrics with the same labelset"). So one ``timestamp()`` per metric, each tagged.
    """
    return " or ".join(
        f'label_replace(timestamp({name}{{{matchers}}}), "family", "{name}", "", "")' for name in SEED_FAMILY_NAMES
    )


def newest(seeds: str = SEEDS) -> str:
    """Per seed of a trainer, the timestamp of its latest export."""
    return f"max by ({TRAINER}, seed_id) ({family_timestamps(seeds)})"


def latest(selector: str, seeds: str = SEEDS) -> str:
    """The series of ``selector`` (one metric) that their seed's latest export sent.

    A push backend has no staleness markers: a layer that left the top-K, or a seed's previous
    stage, keeps answering queries with its last value until the lookback window (VictoriaMetrics,
    Prometheus: 5 min) or the Collector's metric expiry passes. One export sends all of a seed's
    points with one timestamp, so "as new as the seed's newest point" keeps exactly the current
    top-K. (Scraped through the Collector, every point carries the scrape time and the filter keeps
    what the Collector still exposes.) A seed is one per trainer: ``(env_id, seed_id)``.
    """
    return f"({selector} and (timestamp({selector}) >= on ({TRAINER}, seed_id) group_left () {newest(seeds)}))"


def layer_norms(by: str, labels: str = SEEDS_STAGES) -> str:
    """The latest layer norms, per trainer and ``by``."""
    return f"max by ({TRAINER}, {by}) {latest(f'{LAYER_NORM}{{{labels}}}')}"


def layer_nonfinite(labels: str = SEEDS_STAGES) -> str:
    return f"max by ({TRAINER}, seed_id, stage, layer) {latest(f'{LAYER_NONFINITE}{{{labels}}}')} == {NONFINITE_VALUE}"


def not_measured() -> str:
    """Seeds whose latest export says "not measured" (no gradient at any sampled step of the epoch)."""
    return f"max by ({TRAINER}, seed_id, stage) {latest(f'{SEED_NOT_MEASURED}{{{SEEDS_STAGES}}}')} == 1"


def stage_code() -> str:
    """Per seed, its stage as a number (index in ``STAGES`` + 1; ``OTHER_STAGE`` for others).

    A state timeline colours values, not labels. Every (seed, stage) pair in the lookback gets its
    code, and only the pair of the seed's latest export is kept: a series of the previous stage
    stays inside the lookback window of a push backend.
    """
    selectors = [
        (i, f'{{{SEED_FAMILY}, {SEEDS}, stage=~"(SEED_STAGE_)?{stage}"}}') for i, stage in enumerate(STAGES, start=1)
    ]
    selectors.append((OTHER_STAGE, f'{{{SEED_FAMILY}, {SEEDS}, stage!~"(SEED_STAGE_)?({"|".join(STAGES)})"}}'))
    codes = "\n    or ".join(f"{i} * group by ({TRAINER}, seed_id, stage) ({selector})" for i, selector in selectors)
    current = (
        f"max by ({TRAINER}, seed_id, stage) ({family_timestamps(SEEDS)})\n"
        f"    >= on ({TRAINER}, seed_id) group_left () {newest()}"
    )
    return (
        f"max by ({TRAINER}, seed_id) (\n  (\n    {codes}\n  )\n  and on ({TRAINER}, seed_id, stage)\n"
        f"  (\n    {current}\n  )\n)"
    )


def per_trainer(legend: str) -> str:
    """The legend of a per-trainer series; its panel needs the ``NO_TRAINER_RENAME`` transformation."""
    return TRAINER_LEGEND + legend


def query(expr: str, legend: str = "", ref_id: str = "A", instant: bool = False) -> prom.Dataquery:
    q = prom.Dataquery().expr(expr).ref_id(ref_id).datasource(DATASOURCE).legend_format(legend or "__auto")
    if instant:
        return q.instant().format(PromQueryFormat.TABLE)
    return q.range()


def layer_thresholds() -> db.ThresholdsConfig:
    """Blue below the vanishing threshold, red from the exploding one (and for +Inf, non-finite)."""
    return (
        db.ThresholdsConfig()
        .mode(model.ThresholdsMode.ABSOLUTE)  # type: ignore[arg-type]  # StrEnum: 3.11+, so str at 3.10
        .steps(
            [
                model.Threshold(value=None, color="blue"),
                model.Threshold(value=VANISHING_BELOW, color="green"),
                model.Threshold(value=EXPLODING_ABSOLUTE, color="red"),
            ]
        )
    )


def log_axis() -> common_builders.ScaleDistributionConfig:
    return common_builders.ScaleDistributionConfig().type(common.ScaleDistribution.LOG).log(10)  # type: ignore[arg-type]  # StrEnum: 3.11+, so str at 3.10


def legend_table() -> common_builders.VizLegendOptions:
    return (
        common_builders.VizLegendOptions()
        .display_mode(common.LegendDisplayMode.TABLE)  # type: ignore[arg-type]  # StrEnum: 3.11+, so str at 3.10
        .placement(common.LegendPlacement.BOTTOM)
        .show_legend(True)
        .calcs(["lastNotNull", "max"])
    )


def grid(x: int, y: int, w: int, h: int) -> model.GridPos:
    return model.GridPos(x=x, y=y, w=w, h=h)


def nonfinite_panel() -> statetimeline.Panel:
    return (
        statetimeline.Panel()
        .id(1)
        .title("Non-finite layers (NaN/Inf)")
        .grid_pos(grid(0, 0, 6, 7))
        .description(
            "Top-K layers whose epoch gradient norm is NaN or Inf: the OpenTelemetry SDK drops non-finite "
            f"values, so such a layer is exported as {LAYER_NONFINITE} = 1 instead of a norm point. "
            "Matches the alert TolariaSeedLayerNonFinite. Empty while every top-K layer is finite."
        )
        .datasource(DATASOURCE)
        .with_target(query(layer_nonfinite(), per_trainer("{{seed_id}} {{layer}}")))
        .with_transformation(NO_TRAINER_RENAME)
        .unit("none")
        .no_value("none: every top-K layer is finite")
        .mappings(
            [model.ValueMap(options={str(NONFINITE_VALUE): model.ValueMappingResult(text="NaN/Inf", color="red")})]
        )
        .thresholds(
            db.ThresholdsConfig()
            .mode(model.ThresholdsMode.ABSOLUTE)  # type: ignore[arg-type]  # StrEnum: 3.11+, so str at 3.10
            .steps([model.Threshold(value=None, color="green"), model.Threshold(value=NONFINITE_VALUE, color="red")])
        )
        .color_scheme(db.FieldColor().mode(model.FieldColorModeId.THRESHOLDS))  # type: ignore[arg-type]  # StrEnum: 3.11+, so str at 3.10
        .show_value(common.VisibilityMode.AUTO)
        .merge_values(True)
    )


def exploding_panel() -> timeseries.Panel:
    absolute = f"{layer_norms('seed_id, stage, layer')} > {_fmt(EXPLODING_ABSOLUTE)}"
    baseline = (
        f"max by ({TRAINER}, seed_id, stage, layer) (quantile_over_time(0.5, {LAYER_NORM}{{{SEEDS_STAGES}}}"
        f"[{EXPLODING_BASELINE}]))"
    )
    relative = (
        f"({layer_norms('seed_id, stage, layer')} > {_fmt(EXPLODING_FACTOR)} * {baseline})"
        f" > {_fmt(EXPLODING_RELATIVE_FLOOR)}"
    )
    return (
        timeseries.Panel()
        .id(2)
        .title("Exploding layers")
        .grid_pos(grid(6, 0, 6, 7))
        .description(
            f"Top-K layers whose gradient norm is above {_fmt(EXPLODING_ABSOLUTE)} (A), or above "
            f"{_fmt(EXPLODING_FACTOR)}x the layer's median over the last {EXPLODING_BASELINE} and above "
            f"{_fmt(EXPLODING_RELATIVE_FLOOR)} (B): the two "
            "conditions of the alert TolariaSeedLayerGradientExploding. "
            + LAYER_MEANING
            + " Empty while no layer explodes."
        )
        .datasource(DATASOURCE)
        .with_target(query(absolute, per_trainer(f"{{{{seed_id}}}} {{{{layer}}}} > {_fmt(EXPLODING_ABSOLUTE)}")))
        .with_target(
            query(relative, per_trainer(f"{{{{seed_id}}}} {{{{layer}}}} > {_fmt(EXPLODING_FACTOR)}x median"), "B")
        )
        .with_transformation(NO_TRAINER_RENAME)
        .unit("none")
        .no_value("none")
        .thresholds(layer_thresholds())
        .color_scheme(db.FieldColor().mode(model.FieldColorModeId.THRESHOLDS))  # type: ignore[arg-type]  # StrEnum: 3.11+, so str at 3.10
        .thresholds_style(common_builders.GraphThresholdsStyleConfig().mode(common.GraphTresholdsStyleMode.DASHED))  # type: ignore[arg-type]  # StrEnum: 3.11+, so str at 3.10
        .scale_distribution(log_axis())
        .show_points(common.VisibilityMode.ALWAYS)
        .legend(legend_table())
    )


def vanishing_panel() -> timeseries.Panel:
    exempt = f'stage!~"(SEED_STAGE_)?({"|".join(VANISHING_EXEMPT_STAGES)})"'
    expr = f"{layer_norms('seed_id, stage', f'{SEEDS_STAGES}, {exempt}')} < {_fmt(VANISHING_BELOW)}"
    return (
        timeseries.Panel()
        .id(3)
        .title("Vanishing seeds")
        .grid_pos(grid(12, 0, 6, 7))
        .description(
            f"Seeds whose largest top-K layer gradient norm is below {_fmt(VANISHING_BELOW)}: the "
            "condition of the alert TolariaSeedGradientVanishing, which leaves out seeds not expected to "
            f"train ({', '.join(VANISHING_EXEMPT_STAGES)}; a culled seed with alpha 0 has exactly zero "
            "gradients). A seed with no gradient at all is not here but in Seeds not measured. "
            + LAYER_MEANING
            + " Empty while every seed learns."
        )
        .datasource(DATASOURCE)
        .with_target(query(expr, per_trainer("{{seed_id}} ({{stage}})")))
        .with_transformation(NO_TRAINER_RENAME)
        .unit("none")
        .no_value("none")
        .thresholds(layer_thresholds())
        .color_scheme(db.FieldColor().mode(model.FieldColorModeId.THRESHOLDS))  # type: ignore[arg-type]  # StrEnum: 3.11+, so str at 3.10
        .show_points(common.VisibilityMode.ALWAYS)
        .legend(legend_table())
    )


def not_measured_panel() -> statetimeline.Panel:
    return (
        statetimeline.Panel()
        .id(10)
        .title("Seeds not measured")
        .grid_pos(grid(18, 0, 6, 7))
        .description(
            "Seeds whose parameters got no gradient at any sampled step of the epoch (out of the autograd "
            "graph, embargoed, frozen): there is no norm to report, so the seed exports "
            f"{SEED_NOT_MEASURED} = 1 and no layer or total point. Not the same as Vanishing seeds, whose "
            f"gradients exist but are tiny. Expected in the stages {', '.join(NOT_MEASURED_EXEMPT_STAGES)} (a "
            "germinated seed is outside the graph for its first epochs); in "
            f"any other the alert TolariaSeedNotMeasured fires after {NOT_MEASURED_FOR}. Empty while every "
            "seed is measured."
        )
        .datasource(DATASOURCE)
        .with_target(query(not_measured(), per_trainer("{{seed_id}} ({{stage}})")))
        .with_transformation(NO_TRAINER_RENAME)
        .unit("none")
        .no_value("none: every seed is measured")
        .mappings([model.ValueMap(options={"1": model.ValueMappingResult(text="not measured", color="purple")})])
        .color_scheme(db.FieldColor().mode(model.FieldColorModeId.FIXED).fixed_color("purple"))  # type: ignore[arg-type]  # StrEnum: 3.11+, so str at 3.10
        .show_value(common.VisibilityMode.AUTO)
        .merge_values(True)
    )


def latest_table() -> table.Panel:
    # Non-finite layers are part of the exported top-K too: they come back as +Inf, which ranks first
    # (as in the package's own ordering), crosses the red threshold, and is mapped to "NaN/Inf".
    top_k = f"topk by ({TRAINER}, seed_id) ($top_k, {layer_norms('seed_id, stage, layer')})"
    expr = (
        f"topk by ({TRAINER}, seed_id) ($top_k, {layer_norms('seed_id, stage, layer')}\n"
        f"  or max by ({TRAINER}, seed_id, stage, layer) {latest(f'{LAYER_NONFINITE}{{{SEEDS_STAGES}}}')} * +Inf)"
    )
    # The same layers' largest step, a column beside the RMS (a NaN/Inf layer has none).
    largest = (
        f"max by ({TRAINER}, seed_id, stage, layer) {latest(f'{LAYER_NORM_MAX}{{{SEEDS_STAGES}}}')}\n"
        f"  and on ({TRAINER}, seed_id, stage, layer) {top_k}"
    )
    value, step = "RMS gradient L2 norm", "largest step"
    return (
        table.Panel()
        .id(4)
        .title("Latest top-K layers per seed")
        .grid_pos(grid(0, 7, 14, 9))
        .description(
            "The top-K layers of each seed (of each trainer, column env_id when the trainers set it) at "
            "the end of the time range, largest first, with the seed's stage, and each layer's largest "
            "per-step norm of the epoch (a spike the RMS hides). A seed not measured in its "
            "latest epoch has no rows. "
            f"Red: above {_fmt(EXPLODING_ABSOLUTE)} (TolariaSeedLayerGradientExploding) or NaN/Inf "
            f"(TolariaSeedLayerNonFinite); blue: below {_fmt(VANISHING_BELOW)}. " + LAYER_MEANING
        )
        .datasource(DATASOURCE)
        .with_target(query(expr, instant=True))
        .with_target(query(largest, ref_id="B", instant=True))
        .unit("none")
        .decimals(4)
        .thresholds(layer_thresholds())
        .mappings([model.ValueMap(options={"Infinity": model.ValueMappingResult(text="NaN/Inf", color="red")})])
        # One row per layer: the two queries' frames joined on their labels.
        .with_transformation(model.DataTransformerConfig(id_val="merge", options={}))
        .with_transformation(
            model.DataTransformerConfig(
                id_val="organize",
                options={
                    "excludeByName": {"Time": True},
                    "indexByName": {TRAINER: 0, "seed_id": 1, "stage": 2, "layer": 3, "Value #A": 4, "Value #B": 5},
                    "renameByName": {"Value #A": value, "Value #B": step},
                },
            )
        )
        .override_by_name(
            value,
            [
                model.DynamicConfigValue(
                    id_val="custom.cellOptions", value={"type": "color-background", "mode": "basic"}
                )
            ],
        )
        .sort_by([common_builders.TableSortByFieldState().display_name(value).desc(True)])
        .no_value("no layer points: feature off, compact mode, or no seed selected")
    )


def stage_timeline() -> statetimeline.Panel:
    mappings = {
        str(i): model.ValueMappingResult(text=stage, color=STAGE_COLORS[stage], index=i)
        for i, stage in enumerate(STAGES, start=1)
    }
    mappings[str(OTHER_STAGE)] = model.ValueMappingResult(text="other stage", color="text", index=0)
    return (
        statetimeline.Panel()
        .id(5)
        .title("Seed stages")
        .grid_pos(grid(14, 7, 10, 9))
        .description(
            "Each seed's lifecycle stage (Kasmina) over time, from the stage label of its exported series. "
            "Stages are Kasmina's protobuf names, canonically prefixed (SEED_STAGE_TRAINING); the "
            "unprefixed form (TRAINING) shows the same. "
            "A seed absent from a stretch of time was not active (not yet germinated, or culled and "
            "removed), or the feature was off."
        )
        .datasource(DATASOURCE)
        .with_target(query(stage_code(), per_trainer("{{seed_id}}")))
        .with_transformation(NO_TRAINER_RENAME)
        .unit("none")
        .mappings([model.ValueMap(options=mappings)])
        .color_scheme(db.FieldColor().mode(model.FieldColorModeId.FIXED).fixed_color("text"))  # type: ignore[arg-type]  # StrEnum: 3.11+, so str at 3.10
        .show_value(common.VisibilityMode.AUTO)
        .merge_values(True)
        .align_value(common.TimelineValueAlignment.LEFT)
    )


def seed_totals_panel() -> timeseries.Panel:
    expr = f"max by ({TRAINER}, seed_id) {latest(f'{SEED_NORM}{{{SEEDS_STAGES}}}')}"
    return (
        timeseries.Panel()
        .id(6)
        .title("Per-seed total gradient norm")
        .grid_pos(grid(0, 16, 16, 8))
        .description(
            "Per seed, the same statistic over all the seed's parameters (a shared parameter counted once). "
            + VALUE_MEANING
            + " A seed whose total is NaN or Inf has no point (see Non-finite layers), "
            "nor has a seed not measured (see Seeds not measured)."
        )
        .datasource(DATASOURCE)
        .with_target(query(expr, per_trainer("{{seed_id}}")))
        .with_transformation(NO_TRAINER_RENAME)
        .unit("none")
        .scale_distribution(log_axis())
        .show_points(common.VisibilityMode.ALWAYS)
        .line_interpolation(common.LineInterpolation.STEP_AFTER)
        .legend(legend_table())
    )


def volume_panel() -> timeseries.Panel:
    # Totals over the selected trainers, not per trainer: the volume is the backend's load.
    stored = f"count({LAYER_NORM}{{{TRAINERS}}} or {LAYER_NONFINITE}{{{TRAINERS}}})"
    any_seed = f'{TRAINERS}, seed_id!=""'
    exported = (
        f"count({latest(f'{LAYER_NORM}{{{TRAINERS}}}', any_seed)}"
        f" or {latest(f'{LAYER_NONFINITE}{{{TRAINERS}}}', any_seed)})"
    )
    budget = f"sum({SERIES_BUDGET}{{{TRAINERS}}})"
    return (
        timeseries.Panel()
        .id(7)
        .title("Telemetry volume vs budget")
        .grid_pos(grid(16, 16, 8, 8))
        .description(
            "Series of the per-layer family (layer_norm and layer_nonfinite, all seeds of the selected "
            "trainers, every run in the data source) against the budget, summed over the trainers: each "
            f"exports its own as {SERIES_BUDGET}, the per-layer series its latest epoch exports, "
            "min(top_k, layers) per measured seed of the first TOLARIA_SEED_LAYER_MAX_SEEDS (0 in compact "
            "mode), updated at every epoch end. "
            "Latest export: the series each seed's newest export sent, so equal to the budget once the "
            "export has arrived. In the backend: every series still inside the "
            "lookback window; above the budget for a few minutes after the top-K or a stage changes "
            "(a layer that left the top-K stays until the lookback or the Collector's expiry drops it)."
        )
        .datasource(DATASOURCE)
        .with_target(query(stored, "layer series in the backend"))
        .with_target(query(budget, "budget: top_k x seeds", "B"))
        .with_target(query(exported, "layer series of the latest export", "C"))
        .unit("short")
        .min(0)
        .decimals(0)
        .override_by_name(
            "budget: top_k x seeds",
            [
                model.DynamicConfigValue(id_val="color", value={"mode": "fixed", "fixedColor": "red"}),
                model.DynamicConfigValue(id_val="custom.lineStyle", value={"fill": "dash", "dash": [10, 10]}),
                model.DynamicConfigValue(id_val="custom.fillOpacity", value=0),
            ],
        )
        .fill_opacity(10)
        .line_interpolation(common.LineInterpolation.STEP_AFTER)
        .legend(legend_table())
    )


def seed_panel() -> timeseries.Panel:
    expr = f"topk by ({TRAINER}, seed_id) ($top_k, {layer_norms('seed_id, layer')})"
    return (
        timeseries.Panel()
        .id(9)
        .title("Top-K layers: $seed_id")
        .grid_pos(grid(0, 39, 8, 9))
        .description(
            "This seed's top-K layers over time, one line per layer and trainer (a layer that leaves the "
            f"top-K ends its line). Dashed lines: {_fmt(EXPLODING_ABSOLUTE)} "
            f"(TolariaSeedLayerGradientExploding) and {_fmt(VANISHING_BELOW)} (TolariaSeedGradientVanishing). "
            "NaN/Inf layers are in the Non-finite panel. " + LAYER_MEANING
        )
        .datasource(DATASOURCE)
        .with_target(query(expr, per_trainer("{{layer}}")))
        .with_transformation(NO_TRAINER_RENAME)
        .repeat("seed_id")
        .repeat_direction("h")
        .unit("none")
        .thresholds(layer_thresholds())
        .thresholds_style(common_builders.GraphThresholdsStyleConfig().mode(common.GraphTresholdsStyleMode.DASHED))  # type: ignore[arg-type]  # StrEnum: 3.11+, so str at 3.10
        .scale_distribution(log_axis())
        .show_points(common.VisibilityMode.ALWAYS)
        .line_interpolation(common.LineInterpolation.STEP_AFTER)
        .legend(legend_table())
        .no_value("no layer points for this seed")
    )


def step_norm_quantile(quantile: float) -> str:
    """Per seed of a trainer, a quantile of its per-step norms over the steps of the epochs exported within
    ``NOISY_WINDOW``: the window of TolariaSeedGradientNoisy. ``> 0`` drops the NaN of a seed with no step in it."""
    buckets = f"sum by ({TRAINER}, seed_id, le) (increase({SEED_STEP_NORM_BUCKET}{{{SEEDS_STAGES}}}[{NOISY_WINDOW}]))"
    return f"histogram_quantile({quantile:g}, {buckets}) > 0"


def distribution_panel() -> timeseries.Panel:
    return (
        timeseries.Panel()
        .id(11)
        .title(f"Per-step seed norm: p50 and p99 over {NOISY_WINDOW}")
        .grid_pos(grid(0, 24, 10, 8))
        .description(
            "Per seed, the median (p50) and the p99 of its per-step gradient L2 norm (all the seed's "
            "parameters at one sampled optimizer step) over the sampled steps of the epochs exported in the "
            f"last {NOISY_WINDOW}: histogram_quantile over the increase of the histogram "
            f"{SEED_STEP_NORM_BUCKET}, whose buckets the package fixes from 1e-8 to 1e4: one per decade by "
            "default (each quantile within a factor 10 of the exact one: read the decade it is in), four "
            "with TOLARIA_SEED_STEP_NORM_HISTOGRAM=fine (within 1.78). The epoch RMS hides this spread. The "
            f"alert TolariaSeedGradientNoisy fires when p99 stays {NOISY_DECADES} decades above p50 (so above "
            f"{_fmt(NOISY_FACTOR)}x p50) for {NOISY_FOR} "
            f"(at least {NOISY_MIN_STEPS} steps in the window, per stage; here a seed's stages are merged, "
            "the Stage variable filters them). A seed with no sampled step in the window has no point."
        )
        .datasource(DATASOURCE)
        .with_target(query(step_norm_quantile(0.5), per_trainer("{{seed_id}} p50")))
        .with_target(query(step_norm_quantile(0.99), per_trainer("{{seed_id}} p99"), "B"))
        .with_transformation(NO_TRAINER_RENAME)
        .unit("none")
        .scale_distribution(log_axis())
        .show_points(common.VisibilityMode.ALWAYS)
        .legend(legend_table())
        .no_value(f"no sampled step in the last {NOISY_WINDOW}")
    )


def spike_ratio() -> str:
    """Per seed, the latest epoch's largest step over its RMS."""
    per_seed = f"max by ({TRAINER}, seed_id)"
    return (
        f"{per_seed} {latest(f'{SEED_NORM_MAX}{{{SEEDS_STAGES}}}')}\n"
        f"  / {per_seed} {latest(f'{SEED_NORM}{{{SEEDS_STAGES}}}')}"
    )


def spike_panel() -> timeseries.Panel:
    return (
        timeseries.Panel()
        .id(12)
        .title("Spikes: largest step / epoch RMS")
        .grid_pos(grid(10, 24, 7, 8))
        .description(
            "Per seed, the largest per-step gradient norm of the latest epoch over the epoch's RMS (both "
            f"over all the seed's parameters: {SEED_NORM_MAX} / {SEED_NORM}). 1 when every step is alike; "
            "with N sampled steps at most sqrt(N), reached when one step alone carries the gradient, so an "
            f"epoch of at most {int(SPIKE_ABOVE**2)} sampled steps cannot cross the dashed line at "
            f"{_fmt(SPIKE_ABOVE)}. Above it, Tamiyo's in-process health says exploding, and the alert "
            f"TolariaSeedGradientSpike fires when it holds for {SPIKE_FOR} (the step above "
            f"{_fmt(EXPLODING_RELATIVE_FLOOR)}). A seed not measured or with a NaN/Inf total has no point."
        )
        .datasource(DATASOURCE)
        .with_target(query(spike_ratio(), per_trainer("{{seed_id}}")))
        .with_transformation(NO_TRAINER_RENAME)
        .unit("none")
        .min(1)
        .thresholds(
            db.ThresholdsConfig()
            .mode(model.ThresholdsMode.ABSOLUTE)  # type: ignore[arg-type]  # StrEnum: 3.11+, so str at 3.10
            .steps([model.Threshold(value=None, color="green"), model.Threshold(value=SPIKE_ABOVE, color="red")])
        )
        .thresholds_style(common_builders.GraphThresholdsStyleConfig().mode(common.GraphTresholdsStyleMode.DASHED))  # type: ignore[arg-type]  # StrEnum: 3.11+, so str at 3.10
        .show_points(common.VisibilityMode.ALWAYS)
        .line_interpolation(common.LineInterpolation.STEP_AFTER)
        .legend(legend_table())
        .no_value("no measured seed")
    )


def host_ratio_panel() -> timeseries.Panel:
    expr = f"max by ({TRAINER}, seed_id) {latest(f'{SEED_HOST_RATIO}{{{SEEDS_STAGES}}}')}"
    return (
        timeseries.Panel()
        .id(13)
        .title("Seed-to-host gradient ratio")
        .grid_pos(grid(17, 24, 7, 8))
        .description(
            "Per seed, Esper's lifecycle gate: (seed norm / host norm) x sqrt(host parameters / seed "
            "parameters), with the epoch RMS norms and the parameters that had a gradient; 1 means the seed's "
            "gradient per parameter is the host's. The host (every trainable parameter outside the seeds) "
            "is measured only with TOLARIA_SEED_HOST_NORM=true (one more pass over its gradients per step); "
            "without it this panel is empty."
        )
        .datasource(DATASOURCE)
        .with_target(query(expr, per_trainer("{{seed_id}}")))
        .with_transformation(NO_TRAINER_RENAME)
        .unit("none")
        .scale_distribution(log_axis())
        .show_points(common.VisibilityMode.ALWAYS)
        .line_interpolation(common.LineInterpolation.STEP_AFTER)
        .legend(legend_table())
        .no_value("host not measured: set TOLARIA_SEED_HOST_NORM=true")
    )


def clipping_panel() -> timeseries.Panel:
    clipped = f"max by ({TRAINER}) ({CLIPPED_STEPS}{{{TRAINERS}}}) / max by ({TRAINER}) ({CLIP_STEPS}{{{TRAINERS}}})"
    factor = f"min by ({TRAINER}) ({MIN_CLIP_FACTOR}{{{TRAINERS}}})"
    own = f"min by ({TRAINER}, seed_id) ({SEED_MIN_CLIP_FACTOR}{{{SEEDS}}})"
    return (
        timeseries.Panel()
        .id(14)
        .title("Gradient clipping")
        .grid_pos(grid(0, 32, 24, 6))
        .description(
            "Per trainer and epoch, the trainer-level gradient clip as its own fact (a global clip, or the "
            "host's own clip when each seed is clipped apart, as Esper does): the share of sampled steps it "
            "scaled down (A) and its smallest factor min(max_norm / (total + 1e-6), 1) (B); per seed clipped "
            "on its own, its own clip's smallest factor (C). Every norm on this dashboard is measured before "
            "the clip: a seed exploding here while the clip that covers it scales steps by a tiny factor is "
            "hidden from the loss curve (alert TolariaSeedExplodingUnderClipping), and under a global clip "
            "every other seed then trains at that fraction of its step. Empty for a trainer that does not "
            "clip, or whose clip the package cannot reach (docs/operations.md)."
        )
        .datasource(DATASOURCE)
        .with_target(query(clipped, per_trainer("share of steps clipped")))
        .with_target(query(factor, per_trainer("smallest clip factor"), "B"))
        .with_target(query(own, per_trainer("{{seed_id}}: smallest factor of its own clip"), "C"))
        .with_transformation(NO_TRAINER_RENAME)
        .unit("none")
        .max(1)
        .scale_distribution(log_axis())
        .show_points(common.VisibilityMode.ALWAYS)
        .line_interpolation(common.LineInterpolation.STEP_AFTER)
        .legend(legend_table())
        .no_value("no clip seen")
    )


def variables() -> list[db.QueryVariable | db.DatasourceVariable]:
    datasource = (
        db.DatasourceVariable("datasource")
        .label("Data source")
        .type("prometheus")
        .current(model.VariableOption(selected=True, text=DATASOURCE_NAME, value=DATASOURCE_UID))
        .description("The Prometheus-compatible data source (Prometheus or VictoriaMetrics) with the tolaria series.")
    )

    def label_values(name: str, label: str, selector: str) -> db.QueryVariable:
        return (
            db.QueryVariable(name)
            .datasource(DATASOURCE)
            .query({"query": f"label_values({selector}, {label})", "refId": f"{name}-query"})
            .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
        )

    def any_of(variable: db.QueryVariable, sort: model.VariableSort) -> db.QueryVariable:
        """A variable that selects several values, All (``.*``) by default."""
        return (
            variable.multi(True)
            .include_all(True)
            .all_value(ALL)
            .sort(sort)
            .current(model.VariableOption(selected=True, text=["All"], value=["$__all"]))
        )

    # An absent env_id (a single trainer that sets none) matches All (.*) too: a regex matcher
    # tests the empty value of a missing label.
    trainer = any_of(
        label_values(TRAINER, TRAINER, f"{{{SEED_FAMILY}}}")
        .label("Trainer")
        .description(
            "Trainers (the env_id attribute of SeedLayerTelemetry) with tolaria series in the "
            "time range; empty for runs that set none, which All still shows."
        ),
        model.VariableSort.NUMERICAL_ASC,
    )
    seed_id = any_of(
        label_values("seed_id", "seed_id", f"{{{SEED_FAMILY}, {TRAINERS}}}")
        .label("Seed")
        .description("Seeds of the selected trainers with tolaria series in the time range."),
        model.VariableSort.ALPHABETICAL_ASC,
    )
    stage = any_of(
        label_values("stage", "stage", f"{{{SEED_FAMILY}, {SEEDS}}}")
        .label("Stage")
        .description("Lifecycle stages of the selected seeds in the time range."),
        model.VariableSort.ALPHABETICAL_ASC,
    )
    top_k = (
        label_values("top_k", "top_k", f'{SETTINGS_INFO}{{enabled="true", {TRAINERS}}}')
        .label("Top-K")
        .description(
            "Layers shown per seed; the values are the selected trainers' TOLARIA_SEED_LAYER_TOPK "
            "settings in the time range, largest first."
        )
        .sort(model.VariableSort.NUMERICAL_DESC)
    )
    return [datasource, trainer, seed_id, stage, top_k]


def build() -> model.Dashboard:
    dashboard = (
        db.Dashboard(TITLE)
        .uid(UID)
        .tags(["tolaria", "esper", "gradients", "opentelemetry"])
        .description("Per-seed, per-layer gradient summaries from tolaria_otel (tolaria.grad_agg.seed.*).")
        .time("now-6h", "now")
        .refresh("1m")
        .timezone("browser")
        .editable()
        .tooltip(model.DashboardCursorSync.CROSSHAIR)
        .timepicker(db.TimePicker().refresh_intervals(["30s", "1m", "5m", "15m", "1h"]))
    )
    for variable in variables():
        dashboard = dashboard.with_variable(variable)
    for panel in (
        nonfinite_panel(),
        exploding_panel(),
        vanishing_panel(),
        not_measured_panel(),
        latest_table(),
        stage_timeline(),
        seed_totals_panel(),
        volume_panel(),
        distribution_panel(),
        spike_panel(),
        host_ratio_panel(),
        clipping_panel(),
    ):
        dashboard = dashboard.with_panel(panel)
    # An expanded row keeps its panels at the top level of the JSON (only a collapsed row nests them).
    dashboard = dashboard.with_row(
        db.Row("Per seed: top-K layers").id(8).grid_pos(grid(0, 38, 24, 1)).collapsed(False)
    ).with_panel(seed_panel())
    built = dashboard.build()
    built.annotations = model.AnnotationContainer(list_val=[stage_change_annotation()])
    return built


class PrometheusAnnotation(model.AnnotationQuery):
    """A Prometheus annotation query with the title and tag fields the SDK's model does not carry."""

    def __init__(self, title_format: str, tag_keys: str, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.title_format = title_format
        self.tag_keys = tag_keys

    def to_json(self) -> dict[str, object]:
        return {**super().to_json(), "titleFormat": self.title_format, "tagKeys": self.tag_keys}


def stage_change_expr() -> str:
    """(seed, stage) pairs that have a series now and had none one interval earlier: stage entries."""
    pairs = f"group by ({TRAINER}, seed_id, stage) ({{{SEED_FAMILY}, {SEEDS}}}"
    return f"{pairs}) unless {pairs} offset $__interval)"


def stage_change_annotation() -> PrometheusAnnotation:
    return PrometheusAnnotation(
        # Grafana leaves a missing label out of the tags (not of the title): the trainer is a tag.
        title_format="{{seed_id}} entered {{stage}}",
        tag_keys=f"{TRAINER},seed_id,stage",
        name="Stage changes",
        datasource=DATASOURCE,
        enable=True,
        hide=False,
        icon_color="purple",
        type_val="prometheus",
        expr=stage_change_expr(),
    )
