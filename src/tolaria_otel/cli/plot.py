"""Render a run's epoch summaries to a PNG: the Grafana dashboard's main views, without Grafana.

One panel per seed with its top-K layers over epochs (the exported ``layer_norm`` series; NaN or Inf
layers as red crosses at the top edge, stage changes as dotted lines, an epoch the seed was present
for only some steps marked with their number, an epoch it was not measured marked "not measured")
and one panel with every seed's total norm (``seed.norm``; not measured: a hollow marker at the
bottom edge, never a zero). Input: the in-process :class:`EpochSummary` objects, or a JSON
Lines file of ``EpochSummary.to_dict()`` lines, one per epoch (what ``tolaria-otel demo`` writes)::

    python -m tolaria_otel.plot runs/demo.jsonl -o runs/demo.png

Needs matplotlib (``pip install 'tolaria-otel[plot]'``); draws with the Agg canvas, no display.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..summary.epoch_summary import EpochSummary, SeedSummary

SummariesOrPath = Iterable[EpochSummary] | str | os.PathLike[str]

_COLUMNS = 3
_PANEL_SIZE = (5.2, 3.4)


def render(summaries_or_path: SummariesOrPath, out_png: str | os.PathLike[str]) -> Path:
    """Draw the summaries (or the JSON Lines file at that path) into the PNG ``out_png``; return its path."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:  # pragma: no cover - depends on the install
        raise ImportError("plotting needs matplotlib: pip install 'tolaria-otel[plot]'") from error

    if isinstance(summaries_or_path, (str, os.PathLike)):
        summaries = load_summaries(summaries_or_path)
    else:
        summaries = sorted(summaries_or_path, key=lambda s: s.epoch)
    if not summaries:
        raise ValueError("no epoch summaries to plot")
    seed_ids = sorted({seed_id for summary in summaries for seed_id in summary.seeds})

    panels = len(seed_ids) + 1
    columns = min(_COLUMNS, panels)
    rows = math.ceil(panels / columns)
    figure = Figure(figsize=(_PANEL_SIZE[0] * columns, _PANEL_SIZE[1] * rows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    top_k = max(summary.top_k for summary in summaries)
    figure.suptitle(
        f"Seed layer gradients: {len(summaries)} epochs, top {top_k} layers per seed "
        "(RMS per epoch of the gradient L2 norm)"
    )

    for ax, seed_id in zip(axes, seed_ids):
        _seed_panel(ax, seed_id, summaries)
    _totals_panel(axes[len(seed_ids)], seed_ids, summaries)
    for ax in axes[panels:]:
        ax.set_visible(False)

    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    return out


def load_summaries(path: str | os.PathLike[str]) -> list[EpochSummary]:
    """The summaries of a JSON Lines file of ``EpochSummary.to_dict()`` lines, in epoch order."""
    summaries = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                summaries.append(summary_from_dict(json.loads(line)))
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(f"{path}:{number}: not an EpochSummary.to_dict() line: {error}") from None
    return sorted(summaries, key=lambda s: s.epoch)


def summary_from_dict(data: dict[str, Any]) -> EpochSummary:
    """The inverse of ``EpochSummary.to_dict()`` ("NaN" and "Infinity" strings become floats)."""
    seeds = {}
    for seed in data["seeds"]:
        seeds[seed["seed_id"]] = SeedSummary(
            seed_id=seed["seed_id"],
            stage=seed["stage"],
            total_norm=_number(seed["total_norm"]),
            top_layers=tuple((layer["layer"], float(layer["value"])) for layer in seed["top_layers"]),
            layer_count=int(seed["layer_count"]),
            sampled_steps=int(seed.get("sampled_steps", data["sampled_steps"])),  # files from 0.1 have none
            max_norm=_number(seed.get("max_norm")),
            max_step=_count(seed.get("max_step")),
            layer_max_step={layer: _count(step) for layer, step in seed.get("layer_max_step", {}).items()},
            layer_norms={layer: _number(value) for layer, value in seed.get("layers", {}).items()},
            layer_max={layer["layer"]: _number(layer["max"]) for layer in seed["top_layers"] if "max" in layer},
            nonfinite_steps=int(seed.get("nonfinite_steps", 0)),
            step_norm_counts=tuple(int(c) for c in seed.get("step_norm_counts", ())),
            host_ratio=_number(seed.get("host_ratio")),
            health=str(seed.get("health", "")),
            left=bool(seed.get("left", False)),
            partial=bool(seed.get("partial", False)),
            gradient_tensors=_count(seed.get("gradient_tensors")),
            vanishing_tensor_steps=_count(seed.get("vanishing_tensor_steps")),
            exploding_tensor_steps=_count(seed.get("exploding_tensor_steps")),
        )
    return EpochSummary(
        epoch=int(data["epoch"]),
        sampled_steps=int(data["sampled_steps"]),
        top_k=int(data["top_k"]),
        seeds=seeds,
        host_norm=_number(data.get("host_norm")),
        clip_steps=int(data.get("clip_steps", 0)),
        clipped_steps=int(data.get("clipped_steps", 0)),
        min_clip_factor=_number(data.get("min_clip_factor")),
    )


def _number(value: float | str | None) -> float | None:
    return None if value is None else float(value)


def _count(value: int | None) -> int | None:
    return None if value is None else int(value)


def _seed_panel(ax: Any, seed_id: str, summaries: Sequence[EpochSummary]) -> None:
    layers: dict[str, tuple[list[int], list[float]]] = {}
    nonfinite: list[tuple[int, str]] = []
    stages: list[tuple[int, str]] = []
    notes: list[tuple[int, str]] = []
    for summary in summaries:
        seed = summary.seeds.get(seed_id)
        if seed is None:
            continue
        if not stages or stages[-1][1] != seed.stage:
            stages.append((summary.epoch, seed.stage))
        if seed.total_norm is None:
            notes.append((summary.epoch, "not measured"))
        elif seed.sampled_steps < summary.sampled_steps:
            notes.append((summary.epoch, f"{seed.sampled_steps}/{summary.sampled_steps} steps"))
        for layer, value in seed.top_layers:
            if math.isfinite(value):
                epochs, values = layers.setdefault(layer, ([], []))
                epochs.append(summary.epoch)
                values.append(value)
            else:
                nonfinite.append((summary.epoch, layer))
    for layer, (epochs, values) in sorted(layers.items()):
        ax.plot(epochs, values, marker="o", markersize=3, label=layer)
    _value_axis(ax, [v for _, values in layers.values() for v in values])
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
            label="NaN/Inf: " + ", ".join(sorted({layer for _, layer in nonfinite})),
        )
    for epoch, stage in stages:
        ax.axvline(epoch, color="grey", linestyle=":", linewidth=1)
        ax.annotate(
            stage.removeprefix("SEED_STAGE_"),
            (epoch, 1),
            xycoords=("data", "axes fraction"),
            xytext=(2, -2),
            textcoords="offset points",
            va="top",
            fontsize=7,
            color="dimgrey",
        )
    for epoch, note in notes:
        ax.annotate(
            note,
            (epoch, 0),
            xycoords=("data", "axes fraction"),
            xytext=(2, 2),
            textcoords="offset points",
            va="bottom",
            fontsize=7,
            color="darkorange",
        )
    ax.set_title(f"{seed_id}: top-K layers")
    _epoch_axis(ax)
    ax.set_ylabel("gradient norm (RMS)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower right")  # the notes sit at the bottom left of their epoch


def _totals_panel(ax: Any, seed_ids: Sequence[str], summaries: Sequence[EpochSummary]) -> None:
    drawn = []
    unmeasured: dict[str, list[int]] = {}
    for seed_id in seed_ids:
        points = [(s.epoch, s.seeds[seed_id].total_norm) for s in summaries if seed_id in s.seeds]
        finite = [(e, v) for e, v in points if v is not None and math.isfinite(v)]
        line = ax.plot([e for e, _ in finite], [v for _, v in finite], marker="o", markersize=3, label=seed_id)[0]
        drawn += [v for _, v in finite]
        bad = [e for e, v in points if v is not None and not math.isfinite(v)]
        if bad:
            ax.scatter(bad, [max(drawn, default=1.0)] * len(bad), marker="X", s=60, color=line.get_color(), zorder=3)
        unmeasured[line.get_color()] = [e for e, v in points if v is None]
    _value_axis(ax, drawn)
    for color, epochs in unmeasured.items():  # at the bottom edge, whatever the scale
        ax.scatter(
            epochs,
            [0.0] * len(epochs),
            marker="o",
            s=40,
            facecolors="none",
            edgecolors=color,
            zorder=3,
            transform=ax.get_xaxis_transform(),
            clip_on=False,
        )
    ax.set_title("Per-seed total gradient norm (X: NaN/Inf, o at the bottom: not measured)")
    _epoch_axis(ax)
    ax.set_ylabel("gradient norm (RMS)")
    ax.legend(fontsize=7, loc="lower left")


def _value_axis(ax: Any, values: Sequence[float]) -> None:
    """Log scale (norms span orders of magnitude); symlog when a value is exactly 0 (a culled seed)."""
    positive = [v for v in values if v > 0]
    if not positive:
        return
    if len(positive) < len(values):
        ax.set_yscale("symlog", linthresh=min(positive))
    else:
        ax.set_yscale("log")
    ax.grid(True, which="major", alpha=0.3)


def _epoch_axis(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tolaria_otel.plot", description="Render a run's epoch summaries (JSON Lines) to a PNG."
    )
    parser.add_argument("summaries", type=Path, help="JSON Lines file of EpochSummary.to_dict() lines")
    parser.add_argument("-o", "--output", type=Path, help="PNG to write (default: the input with .png)")
    args = parser.parse_args(argv)
    try:
        out = render(args.summaries, args.output or args.summaries.with_suffix(".png"))
    except (OSError, ValueError, ImportError) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
