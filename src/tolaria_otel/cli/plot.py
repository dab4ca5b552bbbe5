"""Render a run's epoch summaries to a PNG: the Grafana dashboard's main views, without Grafana.

One panel per seed with every layer over epochs (``layer_norms``, not only the top-K: a layer that leaves
the top-K and comes back keeps its line; an epoch without the layer is a gap, never a line drawn across)
as the RMS per epoch (solid) and the largest step (dashed); NaN or Inf
layers as red crosses at the top edge, stage changes as dotted lines, an epoch the seed was present for
only some steps marked with their number, an epoch it was not measured marked "not measured". One panel
with every seed's total norm (``seed.norm``, RMS and largest step; not measured: a hollow marker at the
bottom edge, never a zero) and the host's when measured. A panel with the loss when the lines carry the
demo's ``loss``, and one with the smallest clip factor of each epoch when a clip was seen. Input: the
in-process :class:`EpochSummary` objects, or a JSON Lines file of ``EpochSummary.to_dict()`` lines, one
per epoch (what ``tolaria-otel demo`` writes)::

    python -m tolaria_otel.plot runs/demo.jsonl -o runs/demo.png

Needs matplotlib (``pip install 'tolaria-otel[plot]'``); draws with the Agg canvas, no display. For a
page with every value on hover, see ``tolaria-otel report`` (``tolaria_otel.cli.report``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..summary.epoch_summary import EpochSummary, SeedSummary

SummariesOrPath = Iterable[EpochSummary] | str | os.PathLike[str]

_COLUMNS = 3
_PANEL_SIZE = (5.2, 3.4)
#: Line colours: matplotlib's tab10 without its red, which is NaN/Inf's (the HTML report uses the same); past
#: them the markers change, so that a tenth layer is not the first one's twin.
_COLORS = (
    *("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown"),
    *("tab:pink", "tab:gray", "tab:olive", "tab:cyan"),
)
_MARKERS = ("o", "^", "s", "D", "v")


def render(summaries_or_path: SummariesOrPath, out_png: str | os.PathLike[str]) -> Path:
    """Draw the summaries (or the JSON Lines file at that path) into the PNG ``out_png``; return its path."""
    figure = draw(summaries_or_path)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    return out


def draw(summaries_or_path: SummariesOrPath) -> Any:
    """The matplotlib ``Figure`` that :func:`render` saves (on an Agg canvas).

    Every ``Line2D`` has one point per epoch of the run, NaN where there is no finite value (absent, not
    measured, or NaN/Inf, which is drawn as a cross instead): matplotlib breaks a line at a NaN, so a gap stays
    a gap. A layer's lines (in its seed's panel) and a seed's (in the totals panel) have the layer or seed id
    as their ``gid``: the RMS solid, the largest step dashed.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:  # pragma: no cover - depends on the install
        raise ImportError("plotting needs matplotlib: pip install 'tolaria-otel[plot]'") from error

    if isinstance(summaries_or_path, (str, os.PathLike)):
        lines = load_lines(summaries_or_path)
        summaries = [summary for summary, _ in lines]
        losses = {summary.epoch: _loss(line) for summary, line in lines}
    else:
        summaries = sorted(summaries_or_path, key=lambda s: s.epoch)
        losses = {}
    if not summaries:
        raise ValueError("no epoch summaries to plot")
    seed_ids = sorted({seed_id for summary in summaries for seed_id in summary.seeds})
    loss_panel = any(v is not None for v in losses.values())
    clip_panel = any(s.min_clip_factor is not None for s in summaries)

    panels = len(seed_ids) + 1 + loss_panel + clip_panel
    columns = min(_COLUMNS, panels)
    rows = math.ceil(panels / columns)
    figure = Figure(figsize=(_PANEL_SIZE[0] * columns, _PANEL_SIZE[1] * rows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    figure.suptitle(
        f"Seed layer gradients, {len(summaries)} epochs: RMS per epoch of the gradient L2 norm (solid), its largest "
        "step (dashed)\nX at the top: NaN/Inf; o at the bottom: not measured; dotted lines: stage changes",
        fontsize=10,
    )

    epochs = [summary.epoch for summary in summaries]
    for ax, seed_id in zip(axes, seed_ids):
        _seed_panel(ax, seed_id, summaries, epochs)
    _totals_panel(axes[len(seed_ids)], seed_ids, summaries, epochs)
    extra = iter(axes[len(seed_ids) + 1 :])
    if loss_panel:
        _loss_panel(next(extra), [losses.get(e) for e in epochs], epochs)
    if clip_panel:
        _clip_panel(next(extra), summaries, epochs)
    for ax in axes[panels:]:
        ax.set_visible(False)
    return figure


def load_summaries(path: str | os.PathLike[str]) -> list[EpochSummary]:
    """The summaries of a JSON Lines file of ``EpochSummary.to_dict()`` lines, in epoch order."""
    return [summary for summary, _ in load_lines(path)]


def load_lines(path: str | os.PathLike[str]) -> list[tuple[EpochSummary, dict[str, Any]]]:
    """Each line's summary with the line itself, which may hold more (the demo's ``loss``), in epoch order."""
    read = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
                read.append((EpochSummary.from_dict(data), data))
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(f"{path}:{number}: not an EpochSummary.to_dict() line: {error}") from None
    return sorted(read, key=lambda pair: pair[0].epoch)


def _loss(line: dict[str, Any]) -> float | None:
    """The demo's mean training loss of the epoch (not part of EpochSummary); None where a line has no number."""
    value = line.get("loss")
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        return float(value)  # "NaN" and "Infinity" as JSON spells them included
    except ValueError:
        return None


def _finite(value: float | None) -> float:
    """The value to draw on a line: NaN (a break in it) where there is none or it is NaN/Inf."""
    return value if value is not None and math.isfinite(value) else math.nan


def _label(name: str, limit: int = 40) -> str:
    """A seed id or layer name as a title or legend shows it: cut to fit (the HTML report shows it whole), and
    its dollar signs escaped: a name with two of them would be read as mathtext, and fail to draw."""
    cut = name if len(name) <= limit else name[: limit - 1] + "…"
    return cut.replace("$", r"\$")


def _layer_values(seed: SeedSummary) -> Mapping[str, float | None]:
    """Every layer's RMS (``layer_norms``); the top-K where a file from 0.1 has no ``layers``."""
    return seed.layer_norms if seed.layer_norms else dict(seed.top_layers)


def _cycle(ax: Any) -> None:
    from cycler import cycler

    ax.set_prop_cycle(cycler(marker=_MARKERS) * cycler(color=_COLORS))


def _largest_step(ax: Any, epochs: Sequence[int], values: Sequence[float], rms: Any) -> None:
    """Dashed, in the colour of its RMS line; every cycled property given, so the cycle does not move on."""
    color, gid = rms.get_color(), rms.get_gid()
    ax.plot(epochs, values, linestyle="--", linewidth=0.9, color=color, marker="None", label="_largest", gid=gid)


def _seed_panel(ax: Any, seed_id: str, summaries: Sequence[EpochSummary], epochs: Sequence[int]) -> None:
    _cycle(ax)
    present = [(summary, summary.seeds[seed_id]) for summary in summaries if seed_id in summary.seeds]
    layers = list(dict.fromkeys(layer for _, seed in present for layer in _layer_values(seed)))
    nonfinite: list[tuple[int, str]] = []
    drawn: list[float] = []
    for layer in layers:
        rms, largest = [], []
        for summary in summaries:
            seed = summary.seeds.get(seed_id)
            value = _layer_values(seed).get(layer) if seed is not None else None
            if value is not None and not math.isfinite(value):
                nonfinite.append((summary.epoch, layer))
            rms.append(_finite(value))
            largest.append(_finite(seed.layer_max.get(layer)) if seed is not None else math.nan)
        line = ax.plot(epochs, rms, markersize=3, label=_label(layer), gid=layer)[0]
        _largest_step(ax, epochs, largest, line)
        drawn += [v for v in rms + largest if not math.isnan(v)]
    _value_axis(ax, drawn)
    if nonfinite:
        top = ax.get_ylim()[1]
        ax.scatter(
            [e for e, _ in nonfinite],
            [top] * len(nonfinite),
            marker="X",
            s=60,
            color="red",
            zorder=3,
            clip_on=False,
            label=_label("NaN/Inf: " + ", ".join(sorted({layer for _, layer in nonfinite}))),
        )
    stages: list[tuple[int, str]] = []
    for summary, seed in present:
        if not stages or stages[-1][1] != seed.stage:
            stages.append((summary.epoch, seed.stage))
    for epoch, stage in stages:
        ax.axvline(epoch, color="grey", linestyle=":", linewidth=1)
        _vertical_note(ax, epoch, 1, stage.removeprefix("SEED_STAGE_"), "dimgrey", "top")
    for summary, seed in present:
        if seed.total_norm is None:
            _vertical_note(ax, summary.epoch, 0, "not measured", "darkorange", "bottom")
        elif seed.sampled_steps < summary.sampled_steps:
            _vertical_note(ax, summary.epoch, 0, f"{seed.sampled_steps}/{summary.sampled_steps} steps", "darkorange")
    ax.set_title(f"{_label(seed_id)}: every layer", fontsize=10)
    _epoch_axis(ax, epochs)
    ax.set_ylabel("gradient norm")
    _legend(ax)


def _vertical_note(ax: Any, epoch: int, at: float, text: str, color: str, va: str = "bottom") -> None:
    """A note along the epoch's vertical, inside the panel: notes of neighbouring epochs never overlap."""
    ax.annotate(
        text,
        (epoch, at),
        xycoords=("data", "axes fraction"),
        xytext=(2, -3 if va == "top" else 3),
        textcoords="offset points",
        rotation=90,
        va=va,
        ha="left",
        fontsize=7,
        color=color,
        # On a light backing: legible across a line it crosses, and the line still shows through.
        bbox={"facecolor": "white", "alpha": 0.7, "edgecolor": "none", "pad": 0.6},
    )


def _totals_panel(ax: Any, seed_ids: Sequence[str], summaries: Sequence[EpochSummary], epochs: Sequence[int]) -> None:
    _cycle(ax)
    drawn: list[float] = []
    bad: list[tuple[int, str]] = []
    unmeasured: dict[str, list[int]] = {}
    for seed_id in seed_ids:
        seeds = [s.seeds.get(seed_id) for s in summaries]
        rms = [_finite(seed.total_norm) if seed is not None else math.nan for seed in seeds]
        largest = [_finite(seed.max_norm) if seed is not None else math.nan for seed in seeds]
        line = ax.plot(epochs, rms, markersize=3, label=_label(seed_id), gid=seed_id)[0]
        _largest_step(ax, epochs, largest, line)
        drawn += [v for v in rms + largest if not math.isnan(v)]
        for epoch, seed in zip(epochs, seeds):
            if seed is not None and seed.total_norm is not None and not math.isfinite(seed.total_norm):
                bad.append((epoch, line.get_color()))
        unmeasured[line.get_color()] = [e for e, seed in zip(epochs, seeds) if seed is not None and not seed.measured]
    hosts = [_finite(s.host_norm) for s in summaries]
    if any(not math.isnan(v) for v in hosts):
        ax.plot(epochs, hosts, color="black", marker="None", linestyle=":", linewidth=1.2, label="host")
        drawn += [v for v in hosts if not math.isnan(v)]
    _value_axis(ax, drawn)
    top = ax.get_ylim()[1]
    for epoch, color in bad:
        ax.scatter([epoch], [top], marker="X", s=60, color=color, zorder=3, clip_on=False)
    for color, unmeasured_epochs in unmeasured.items():  # at the bottom edge, whatever the scale
        ax.scatter(
            unmeasured_epochs,
            [0.0] * len(unmeasured_epochs),
            marker="o",
            s=40,
            facecolors="none",
            edgecolors=color,
            zorder=3,
            transform=ax.get_xaxis_transform(),
            clip_on=False,
        )
    ax.set_title("Seed totals", fontsize=10)
    _epoch_axis(ax, epochs)
    ax.set_ylabel("gradient norm")
    _legend(ax)


def _loss_panel(ax: Any, losses: Sequence[float | None], epochs: Sequence[int]) -> None:
    """The training loss, when the lines carry it (the demo's ``loss``)."""
    ax.plot(epochs, [_finite(v) for v in losses], marker="o", markersize=3, color="black", label="loss")
    ax.grid(True, alpha=0.3)
    ax.set_title("Training loss", fontsize=10)
    _epoch_axis(ax, epochs)
    ax.set_ylabel("loss")


def _clip_panel(ax: Any, summaries: Sequence[EpochSummary], epochs: Sequence[int]) -> None:
    """The smallest clip factor of each epoch, when a clip was seen; the clipped steps in its notes."""
    factors = [s.min_clip_factor for s in summaries]
    ax.plot(epochs, [_finite(v) for v in factors], marker="s", markersize=3, color="tab:purple", label="clip factor")
    for summary in summaries:
        if summary.min_clip_factor is not None:
            _vertical_note(ax, summary.epoch, 0, f"{summary.clipped_steps}/{summary.clip_steps} clipped", "dimgrey")
    ax.set_ylim(0, 1.05)
    ax.grid(True, alpha=0.3)
    ax.set_title("Smallest clip factor (1: not scaled)", fontsize=10)
    _epoch_axis(ax, epochs)
    ax.set_ylabel("clip factor")


def _legend(ax: Any, limit: int = 24) -> None:
    """Beside the panel, so that it never hides a line; the dashed largest steps share their line's entry."""
    from matplotlib.lines import Line2D

    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return
    more = len(handles) - limit
    handles, labels = handles[:limit], labels[:limit]
    if more > 0:
        handles.append(Line2D([], [], linestyle="none"))
        labels.append(f"and {more} more")
    handles.append(Line2D([], [], color="grey", linestyle="--", linewidth=0.9))
    labels.append("largest step")
    ax.legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def _value_axis(ax: Any, values: Sequence[float]) -> None:
    """Log scale (norms span orders of magnitude); symlog when a value is exactly 0 (a culled seed)."""
    positive = [v for v in values if v > 0]
    if not positive:
        return
    if len(positive) < len(values):
        ax.set_yscale("symlog", linthresh=min(positive))
    else:
        ax.set_yscale("log")
        # Labels as plain numbers ("7", not "7x10^0"): within a decade matplotlib labels the minor ticks only.
        from matplotlib.ticker import LogFormatter

        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))
    ax.grid(True, which="major", alpha=0.3)


def _epoch_axis(ax: Any, epochs: Sequence[int]) -> None:
    """Every panel over the run's epochs, so that one epoch is at one place in each."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    margin = max(0.5, (epochs[-1] - epochs[0]) * 0.03)
    ax.set_xlim(epochs[0] - margin, epochs[-1] + margin)
    ax.set_xlabel("epoch")
