"""A run's epoch summaries as one self-contained HTML page: ``tolaria-otel report`` (``report_command``).

The page needs nothing at view time (no network, no script: inline CSS and SVG, drawn by ``report_chart``).
It shows the run (every seed's total norm, RMS and largest step, the host's when measured; the loss and the
clip factor when the lines carry them) and, per seed, every layer of ``layer_norms`` over the epochs (not
only the top-K: a layer that leaves the top-K and comes back keeps its line) with the epochs where a layer
is absent or not measured as gaps, its layers' largest steps (the JSON keeps a layer's largest step only
while it is in the top-K), its stages as a strip, and a table of its epochs. Every value says itself when
hovered. Every name from the run (seed ids, layer names, stages) is escaped: a layer's name can hold anything.

Input: the in-process :class:`EpochSummary` objects, or a JSON Lines file of ``EpochSummary.to_dict()``
lines (what ``tolaria-otel demo`` writes, with each epoch's ``loss``). The step at which the largest step
came (``max_step`` of a seed, ``max_step`` of a top-K layer or a seed's ``layer_max_step`` mapping) is shown
where a line or summary has it; nothing needs it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from html import escape
from pathlib import Path
from typing import Any

from ..summary import EpochSummary, SeedSummary
from .plot import load_lines
from .report_chart import CSS, Band, Point, Series, line_chart, style

SummariesOrPath = Iterable[EpochSummary] | str | os.PathLike[str]

#: Kasmina's stages, by the name without its prefix; any other stage gets the fallback.
_STAGE_COLORS = {
    "GERMINATED": "#c7e9c0",
    "TRAINING": "#c6dbef",
    "BLENDING": "#dadaeb",
    "FOSSILIZED": "#e0e0e0",
    "CULLED": "#fcbba1",
}
_OTHER_STAGE_COLOR = "#fdd0a2"
_HOST_COLOR = "#222222"
_MAX_DASH = "5 3"  # a seed's largest step beside its RMS, in the run's chart


@dataclass(frozen=True)
class _Epoch:
    """One epoch's summary and the JSON line it came from (empty for an in-process summary)."""

    summary: EpochSummary
    line: Mapping[str, Any]

    @property
    def number(self) -> int:
        return self.summary.epoch

    @cached_property
    def seed_lines(self) -> Mapping[str, Mapping[str, Any]]:
        """The line's seed objects by seed id (read once: a page looks each seed up once per layer)."""
        seeds = self.line.get("seeds", ())
        return {s["seed_id"]: s for s in seeds if isinstance(s, dict) and isinstance(s.get("seed_id"), str)}


def build_report(summaries_or_path: SummariesOrPath, *, title: str | None = None) -> str:
    """The HTML page of the summaries (or of the JSON Lines file at that path)."""
    if isinstance(summaries_or_path, (str, os.PathLike)):
        run = load_epochs(summaries_or_path)
        title = title or Path(summaries_or_path).name
    else:
        run = sorted((_Epoch(s, {}) for s in summaries_or_path), key=lambda e: e.number)
    if not run:
        raise ValueError("no epoch summaries to report")
    seed_ids = sorted({seed_id for epoch in run for seed_id in epoch.summary.seeds})
    heading = "Seed layer gradients" + (f": {title}" if title else "")
    body = [
        f"<header><h1>{escape(heading)}</h1>",
        f'<p class="meta">{escape(_run_facts(run, seed_ids))}</p></header>',
        _run_section(run, seed_ids),
        *(_seed_section(run, seed_id, index) for index, seed_id in enumerate(seed_ids)),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{escape(heading)}</title>\n<style>{_PAGE_CSS}{CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


def write_report(summaries_or_path: SummariesOrPath, out_html: str | os.PathLike[str]) -> Path:
    """Write the page of the summaries (or of the JSON Lines file at that path) to ``out_html``; return its path."""
    page = build_report(summaries_or_path)
    out = Path(out_html)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out


def load_epochs(path: str | os.PathLike[str]) -> list[_Epoch]:
    """The epochs of a JSON Lines file of ``EpochSummary.to_dict()`` lines, in epoch order, each with its line."""
    return [_Epoch(summary, line) for summary, line in load_lines(path)]


# -- what the lines hold beyond EpochSummary ----------------------------------------------------------


def _loss(epoch: _Epoch) -> float | None:
    return _optional_number(epoch.line.get("loss"))


def _optional_number(value: object) -> float | None:
    """A number of the line, "NaN" and "Infinity" as JSON spells them included; None for anything else."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        return float(value)
    except ValueError:
        return None


def _max_step(epoch: _Epoch, seed: SeedSummary) -> int | None:
    return _step(epoch.seed_lines.get(seed.seed_id, {}).get("max_step", getattr(seed, "max_step", None)))


def _layer_max_steps(epoch: _Epoch, seed: SeedSummary) -> dict[str, int | None]:
    line = epoch.seed_lines.get(seed.seed_id, {})
    steps = {str(k): _step(v) for k, v in dict(getattr(seed, "layer_max_step", None) or {}).items()}
    mapping = line.get("layer_max_step")
    if isinstance(mapping, dict):
        steps.update({str(k): _step(v) for k, v in mapping.items()})
    for layer in line.get("top_layers", ()):
        if isinstance(layer, dict) and "max_step" in layer:
            steps[str(layer.get("layer"))] = _step(layer["max_step"])
    return steps


def _step(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _layer_values(seed: SeedSummary) -> Mapping[str, float | None]:
    """Every layer's RMS; from the top-K where a file from 0.1 has no ``layers``."""
    return seed.layer_norms if seed.layer_norms else dict(seed.top_layers)


# -- the run -------------------------------------------------------------------------------------------


def _run_facts(run: Sequence[_Epoch], seed_ids: Sequence[str]) -> str:
    steps = sorted({e.summary.sampled_steps for e in run})
    clips = [e.summary for e in run if e.summary.min_clip_factor is not None]
    facts = [
        _count(len(run), "epoch") + f" ({run[0].number} to {run[-1].number})",
        _count(len(seed_ids), "seed"),
        f"top {_count(max(e.summary.top_k for e in run), 'layer')} kept per seed",
        f"{steps[0]}" + (f" to {steps[-1]}" if len(steps) > 1 else "") + " sampled steps per epoch",
        "values: RMS over the sampled steps of the gradient L2 norm, and its largest step",
        "host measured" if any(e.summary.host_norm is not None for e in run) else "host not measured",
    ]
    if clips:
        clipped = sum(s.clipped_steps for s in clips)
        seen = sum(s.clip_steps for s in clips)
        smallest = min(s.min_clip_factor for s in clips if s.min_clip_factor is not None)
        facts.append(f"clipped {clipped} of {seen} steps, smallest factor {smallest:.3g}")
    else:
        facts.append("no clip seen")
    return "; ".join(facts)


def _run_section(run: Sequence[_Epoch], seed_ids: Sequence[str]) -> str:
    epochs = [e.number for e in run]
    totals: list[Series] = []
    for index, seed_id in enumerate(seed_ids):
        color, _ = style(index)
        rms, largest = [], []
        for epoch in run:
            seed = epoch.summary.seeds.get(seed_id)
            if seed is None:
                rms.append(Point(None))
                largest.append(Point(None))
                continue
            facts = _seed_facts(epoch, seed)
            rms.append(Point(seed.total_norm, "RMS; " + facts))
            at = _max_step(epoch, seed)
            largest.append(Point(seed.max_norm, "largest step" + (f" (step {at})" if at is not None else "")))
        totals.append(Series(seed_id, rms, color))
        totals.append(Series(f"{seed_id} largest step", largest, color, _MAX_DASH))
    legend = [(seed_id, style(i)[0], "", _anchor(i)) for i, seed_id in enumerate(seed_ids)]
    legend.append(("largest step: dashed, in the seed's colour", "#555555", _MAX_DASH, ""))
    if any(e.summary.host_norm is not None for e in run):
        totals.append(Series("host", [Point(e.summary.host_norm, "host RMS") for e in run], _HOST_COLOR, "1 3"))
        legend.append(("host (RMS)", _HOST_COLOR, "1 3", ""))
    title = "Seed totals: RMS (solid) and largest step (dashed)"
    charts = [_figure(line_chart(title, epochs, totals, y_label="gradient norm"), _legend(legend))]
    losses = [_loss(e) for e in run]
    if any(v is not None for v in losses):
        loss = Series("loss", [Point(v) for v in losses], "#333333")
        charts.append(_figure(line_chart("Training loss", epochs, [loss], y_label="loss", log=False), ""))
    if any(e.summary.min_clip_factor is not None for e in run):
        clip = Series("smallest clip factor", [Point(e.summary.min_clip_factor, _clip_facts(e)) for e in run], "#555")
        chart = line_chart(
            "Clip factor: smallest per epoch (1: never scaled)",
            epochs,
            [clip],
            y_label="clip factor",
            log=False,
            include_zero=True,
        )
        charts.append(_figure(chart, ""))
    return f'<section class="run"><h2>Run</h2><div class="charts">{"".join(charts)}</div></section>'


def _clip_facts(epoch: _Epoch) -> str:
    s = epoch.summary
    return f"clipped {s.clipped_steps} of {s.clip_steps} steps" if s.min_clip_factor is not None else ""


def _seed_facts(epoch: _Epoch, seed: SeedSummary) -> str:
    facts = [seed.stage.removeprefix("SEED_STAGE_")]
    if seed.health:
        facts.append(seed.health)
    facts.append(f"{seed.sampled_steps}/{epoch.summary.sampled_steps} steps")
    if seed.total_norm is None:
        facts.append("not measured")
    if seed.left:
        facts.append("left this epoch")
    if seed.partial:
        facts.append("partial")
    return ", ".join(facts)


# -- one seed ------------------------------------------------------------------------------------------


def _seed_section(run: Sequence[_Epoch], seed_id: str, index: int) -> str:
    present = [(i, e, e.summary.seeds[seed_id]) for i, e in enumerate(run) if seed_id in e.summary.seeds]
    layers = list(dict.fromkeys(layer for _, _, seed in present for layer in _layer_values(seed)))
    epochs = [e.number for e in run]
    rms: list[Series] = []
    largest: list[Series] = []
    # What each epoch says of the seed, worked out once for all its layers (None: the seed is not in the epoch).
    per_epoch = [
        (
            seed,
            _seed_facts(epoch, seed),
            {name: r for r, (name, _) in enumerate(seed.top_layers, 1)},
            _layer_max_steps(epoch, seed),
        )
        if (seed := epoch.summary.seeds.get(seed_id)) is not None
        else None
        for epoch in run
    ]
    for number, layer in enumerate(layers):
        color, dash = style(number)
        rms_points, max_points = [], []
        for known in per_epoch:
            if known is None:
                rms_points.append(Point(None))
                max_points.append(Point(None))
                continue
            seed, facts, ranks, steps = known
            rank = f"top-K #{ranks[layer]}" if layer in ranks else "not in the top-K"
            rms_points.append(Point(_layer_values(seed).get(layer), f"{rank}; {facts}"))
            at = steps.get(layer)
            max_points.append(Point(seed.layer_max.get(layer), f"step {at}" if at is not None else ""))
        rms.append(Series(layer, rms_points, color, dash))
        largest.append(Series(layer, max_points, color, dash))
    bands = _stage_bands(run, seed_id)
    notes = [(i, _note(e, seed)) for i, e, seed in present if _note(e, seed)]
    rms_chart = line_chart(
        "Every layer: RMS per epoch", epochs, rms, y_label="gradient norm (RMS)", bands=bands, notes=notes
    )
    max_chart = line_chart(
        "Largest step per layer",
        epochs,
        largest,
        y_label="gradient norm (largest step)",
        bands=bands,
        empty_text="no largest step in these lines",
    )
    charts = _figure(rms_chart, "") + _figure(max_chart, "")
    legend = _legend([(s.name, s.color, s.dash, "") for s in rms])
    stages = " → ".join(dict.fromkeys(seed.stage.removeprefix("SEED_STAGE_") for _, _, seed in present))
    facts = (
        f"epochs {present[0][1].number} to {present[-1][1].number}; {_count(len(layers), 'layer')}; stages {stages}"
        if present
        else "never present"
    )
    return (
        f'<section class="seed" id="{_anchor(index)}"><h2>{escape(seed_id)}</h2>'
        f'<p class="meta">{escape(facts)}</p><div class="charts">{charts}</div>{legend}'
        f"{_seed_table(present)}</section>"
    )


def _note(epoch: _Epoch, seed: SeedSummary) -> str:
    """What the RMS chart says at the bottom of an epoch: why it has no points, or over how few steps they are."""
    if seed.total_norm is None:
        return "not measured"
    if seed.sampled_steps < epoch.summary.sampled_steps:
        return f"{seed.sampled_steps}/{epoch.summary.sampled_steps} steps"
    return ""


def _stage_bands(run: Sequence[_Epoch], seed_id: str) -> list[Band]:
    """One strip per run of neighbouring epochs in one stage; an epoch without the seed ends it."""
    bands: list[Band] = []
    first: int | None = None
    for i, epoch in enumerate([*run, None]):
        seed = epoch.summary.seeds.get(seed_id) if epoch is not None else None
        stage = seed.stage if seed is not None else None
        if first is not None and (stage is None or stage != run[first].summary.seeds[seed_id].stage):
            name = run[first].summary.seeds[seed_id].stage
            short = name.removeprefix("SEED_STAGE_")
            hover = f"{name}: epoch {run[first].number}" + (f" to {run[i - 1].number}" if i - 1 > first else "")
            bands.append(Band(first, i - 1, short, _STAGE_COLORS.get(short, _OTHER_STAGE_COLOR), hover))
            first = None
        if stage is not None and first is None:
            first = i
    return bands


_TABLE_HEAD = (
    "epoch",
    "stage",
    "health",
    "steps",
    "total RMS",
    "largest step",
    "host ratio",
    "top-K layers (RMS)",
    "notes",
)


def _seed_table(present: Sequence[tuple[int, _Epoch, SeedSummary]]) -> str:
    rows = []
    for _, epoch, seed in present:
        at = _max_step(epoch, seed)
        notes = [
            note
            for note, on in (
                ("not measured", seed.total_norm is None),
                (f"{seed.nonfinite_steps} non-finite steps", seed.nonfinite_steps > 0),
                ("left this epoch", seed.left),
                ("partial", seed.partial),
            )
            if on
        ]
        cells = (
            str(epoch.number),
            seed.stage,
            seed.health,
            f"{seed.sampled_steps}/{epoch.summary.sampled_steps}",
            _value(seed.total_norm),
            _value(seed.max_norm) + (f" at step {at}" if at is not None else ""),
            _value(seed.host_ratio),
            ", ".join(f"{layer} {value:.4g}" for layer, value in seed.top_layers) or "-",
            ", ".join(notes),
        )
        rows.append("<tr>" + "".join(f"<td>{escape(cell)}</td>" for cell in cells) + "</tr>")
    header = "".join(f"<th>{escape(cell)}</th>" for cell in _TABLE_HEAD)
    return (
        f"<details><summary>Epochs table</summary><table><thead><tr>{header}</tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table></details>"
    )


# -- page pieces ---------------------------------------------------------------------------------------


def _figure(chart: str, legend: str) -> str:
    return f"<figure>{chart}{legend}</figure>"


def _legend(entries: Sequence[tuple[str, str, str, str]]) -> str:
    """Legend entries (name, colour, dash, link target or empty), as HTML so that long names wrap."""
    items = []
    for name, color, dash, target in entries:
        dashed = f' stroke-dasharray="{dash}"' if dash else ""
        swatch = (
            f'<svg class="swatch" viewBox="0 0 28 10" width="28" height="10"><line x1="0" y1="5" x2="28" y2="5" '
            f'stroke="{color}" stroke-width="2.5"{dashed}/></svg>'
        )
        label = f'<a href="#{target}">{escape(name)}</a>' if target else escape(name)
        items.append(f"<li>{swatch}{label}</li>")
    return f'<ul class="legend">{"".join(items)}</ul>'


def _count(number: int, thing: str) -> str:
    return f"{number} {thing}" + ("" if number == 1 else "s")


def _anchor(index: int) -> str:
    """A seed section's id: by position, since a seed id may hold anything an id cannot."""
    return f"seed-{index}"


def _value(value: float | None) -> str:
    if value is None:
        return "not measured"
    return f"{value:.4g}" if math.isfinite(value) else str(value)


_PAGE_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; color: #222; margin: 0 auto; padding: 12px 20px; max-width: 1400px; }
h1 { font-size: 20px; margin: 4px 0; }
h2 { font-size: 16px; margin: 18px 0 2px; overflow-wrap: anywhere; }
.meta { color: #555; margin: 2px 0 8px; overflow-wrap: anywhere; }
.charts { display: grid; grid-template-columns: repeat(2, minmax(0, 1fr)); gap: 8px 20px; }
figure { margin: 0; }
.legend { list-style: none; padding: 0; margin: 2px 0 6px; display: flex; flex-wrap: wrap; gap: 2px 16px; }
.legend li { display: flex; align-items: center; gap: 4px; overflow-wrap: anywhere; }
section.seed { border-top: 1px solid #ddd; margin-top: 10px; }
details { margin: 4px 0 8px; }
table { border-collapse: collapse; font-size: 13px; margin-top: 4px; }
th, td { border: 1px solid #ddd; padding: 2px 6px; text-align: left; vertical-align: top; overflow-wrap: anywhere; }
td:nth-child(n+4):nth-child(-n+7) { text-align: right; font-variant-numeric: tabular-nums; }
"""
