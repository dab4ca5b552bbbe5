"""Inline SVG line charts over epochs for the HTML report (``report``): no script, no library, no URL.

A series has one point per epoch of the chart, whose value is None where it has none (the layer absent
or not measured that epoch, a largest step outside the top-K): a line joins only the points of
neighbouring epochs, so a gap stays a gap and is never drawn across. On a log axis (norms span orders
of magnitude) a NaN or Inf is a red cross at the top edge and a value of 0 or below a hollow marker at
the bottom edge; neither is joined to its neighbours, both say their value when hovered. Every point
carries an SVG ``<title>``: the browser shows it as the hover text.

The elements carry what a test (or a script) needs to read the chart back: each series is a
``<g class="series" data-series="NAME">`` holding one ``<path class="line">`` (``M`` starts a run of
joined points, ``L`` continues it) and one marker per point with its ``data-epoch``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

WIDTH, HEIGHT = 660, 300
_LEFT, _RIGHT, _TOP, _BOTTOM = 64, 16, 34, 40
_BAND = 16  # the height of the stage strip above the plot area, when there is one
_LABEL_CHAR = 6.5  # the width of a capital of the strip's 10px labels, to shorten a label that would not fit


@dataclass(frozen=True)
class Point:
    """One epoch of a series: its value (None: nothing that epoch, a gap) and what its hover text adds."""

    value: float | None
    note: str = ""


@dataclass(frozen=True)
class Series:
    name: str
    points: Sequence[Point]  # one per epoch of the chart, in its order
    color: str
    dash: str = ""  # an SVG stroke-dasharray; empty: solid


@dataclass(frozen=True)
class Band:
    """A run of epochs (indices ``first`` to ``last`` of the chart's epochs) drawn as one strip, e.g. a stage."""

    first: int
    last: int
    label: str
    color: str
    hover: str


def line_chart(
    title: str,
    epochs: Sequence[int],
    series: Sequence[Series],
    *,
    y_label: str,
    log: bool = True,
    include_zero: bool = False,
    bands: Sequence[Band] = (),
    notes: Sequence[tuple[int, str]] = (),
    empty_text: str = "no values",
) -> str:
    """The chart as an ``<svg>`` element (sized by its container: ``viewBox`` only); ``notes`` are short texts
    at the bottom of the plot area at an epoch (by index), such as "not measured". A linear axis spans the values
    (a loss's changes show), from 0 with ``include_zero`` (a factor's scale)."""
    top = _TOP + (_BAND + 4 if bands else 0)
    area = _Area(_LEFT, top, WIDTH - _RIGHT, HEIGHT - _BOTTOM)
    x = _x_scale(epochs, area)
    values = [p.value for s in series for p in s.points if p.value is not None and math.isfinite(p.value)]
    y = _y_scale(values, area, log, include_zero)
    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(title)}">',
        f'<text class="chart-title" x="{_LEFT}" y="18">{escape(title)}</text>',
        f'<rect class="plot" x="{area.left}" y="{area.top}" width="{area.width}" height="{area.height}"/>',
    ]
    parts += _x_axis(epochs, x, area)
    parts += _y_axis(y, area, y_label)
    parts += _bands(bands, epochs, x, area)
    if y is None:
        parts.append(
            f'<text class="empty" x="{(area.left + area.right) / 2:.1f}" y="{(area.top + area.bottom) / 2:.1f}" '
            f'text-anchor="middle">{escape(empty_text)}</text>'
        )
    parts += (f'<text class="note" x="{x[i] + 3:.1f}" y="{area.bottom - 5}">{escape(text)}</text>' for i, text in notes)
    parts += (_series(s, epochs, x, y, area) for s in series)
    parts.append("</svg>")
    return "\n".join(parts)


@dataclass(frozen=True)
class _Area:
    left: float
    top: float
    right: float
    bottom: float

    @property
    def width(self) -> float:
        return self.right - self.left

    @property
    def height(self) -> float:
        return self.bottom - self.top


@dataclass(frozen=True)
class _Scale:
    low: float  # in axis units: log10 of the value on a log axis
    high: float
    area: _Area
    log: bool

    def __call__(self, value: float) -> float:
        unit = math.log10(value) if self.log else value
        return self.area.bottom - (unit - self.low) / (self.high - self.low) * self.area.height

    def on_scale(self, value: float) -> bool:
        return math.isfinite(value) and (value > 0 or not self.log)


def _x_scale(epochs: Sequence[int], area: _Area) -> list[float]:
    if len(epochs) < 2 or epochs[0] == epochs[-1]:
        return [area.left + area.width / 2] * len(epochs)
    pad = area.width * 0.03
    span = epochs[-1] - epochs[0]
    return [area.left + pad + (e - epochs[0]) / span * (area.width - 2 * pad) for e in epochs]


def _y_scale(values: Sequence[float], area: _Area, log: bool, include_zero: bool) -> _Scale | None:
    drawn = [v for v in values if v > 0] if log else list(values)
    if not drawn:
        return None
    low, high = min(drawn), max(drawn)
    if log:
        low, high = math.log10(low), math.log10(high)
    elif include_zero:
        low = min(low, 0.0)
    pad = (high - low) * 0.06 or (0.5 if log else abs(high) * 0.1 or 1.0)
    return _Scale(low if include_zero and low == 0 else low - pad, high + pad, area, log)


def _x_axis(epochs: Sequence[int], x: Sequence[float], area: _Area) -> list[str]:
    step = _nice_step(len(epochs) / 12) if len(epochs) > 12 else 1
    parts = []
    for i, epoch in enumerate(epochs):
        if i % max(1, int(step)) and i != len(epochs) - 1:
            continue
        parts.append(
            f'<line class="tick" x1="{x[i]:.1f}" y1="{area.bottom}" x2="{x[i]:.1f}" y2="{area.bottom + 4}"/>'
            f'<text class="tick-label" x="{x[i]:.1f}" y="{area.bottom + 16}" text-anchor="middle">{epoch}</text>'
        )
    parts.append(
        f'<text class="axis-label" x="{(area.left + area.right) / 2:.1f}" y="{HEIGHT - 6}" '
        'text-anchor="middle">epoch</text>'
    )
    return parts


def _y_axis(y: _Scale | None, area: _Area, label: str) -> list[str]:
    middle = (area.top + area.bottom) / 2
    parts = [
        f'<text class="axis-label" x="14" y="{middle:.1f}" text-anchor="middle" '
        f'transform="rotate(-90 14 {middle:.1f})">{escape(label)}</text>'
    ]
    if y is None:
        return parts
    for value in _y_ticks(y):
        at = y(value)
        parts.append(
            f'<line class="grid" x1="{area.left}" y1="{at:.1f}" x2="{area.right}" y2="{at:.1f}"/>'
            f'<text class="tick-label" x="{area.left - 6}" y="{at + 4:.1f}" text-anchor="end">{value:.3g}</text>'
        )
    return parts


def _y_ticks(y: _Scale) -> list[float]:
    if y.log:
        decades = range(math.ceil(y.low), math.floor(y.high) + 1)
        multiples = (1.0,) if len(decades) >= 2 else (1.0, 2.0, 5.0)
        ticks = [m * 10.0**d for d in range(math.floor(y.low), math.ceil(y.high) + 1) for m in multiples]
        ticks = [t for t in ticks if y.low <= math.log10(t) <= y.high]
        if len(ticks) >= 2:
            return ticks
        return _linear_ticks(10.0**y.low, 10.0**y.high)  # a narrow range, inside one decade: evenly spaced values
    return _linear_ticks(y.low, y.high)


def _linear_ticks(low: float, high: float) -> list[float]:
    step = _nice_step((high - low) / 5)
    first = math.ceil(low / step)
    return [k * step for k in range(first, first + 12) if k * step <= high]


def _nice_step(rough: float) -> float:
    """1, 2 or 5 times a power of ten, at least ``rough``."""
    power = 10.0 ** math.floor(math.log10(rough))
    return next(m * power for m in (1.0, 2.0, 5.0, 10.0) if m * power >= rough)


def _bands(bands: Sequence[Band], epochs: Sequence[int], x: Sequence[float], area: _Area) -> list[str]:
    if not bands:
        return []
    top = area.top - _BAND - 4
    parts = []
    for band in bands:
        # An epoch's slot reaches halfway to its neighbours, so that the strips of neighbouring epochs touch.
        left = (x[band.first - 1] + x[band.first]) / 2 if band.first > 0 else area.left
        right = (x[band.last] + x[band.last + 1]) / 2 if band.last + 1 < len(x) else area.right
        fits = max(1, int((right - left - 6) / _LABEL_CHAR))
        label = band.label if len(band.label) <= fits else band.label[: max(1, fits - 1)] + "…"
        parts.append(
            f'<g class="band"><title>{escape(band.hover)}</title>'
            f'<rect x="{left:.1f}" y="{top}" width="{right - left:.1f}" height="{_BAND}" fill="{band.color}"/>'
            f'<text class="band-label" x="{left + 3:.1f}" y="{top + 12}">{escape(label)}</text>'
            f'<line class="change" x1="{x[band.first]:.1f}" y1="{area.top}" x2="{x[band.first]:.1f}" '
            f'y2="{area.bottom}"/></g>'
        )
    return parts


def _series(series: Series, epochs: Sequence[int], x: Sequence[float], y: _Scale | None, area: _Area) -> str:
    path: list[str] = []
    marks: list[str] = []
    joined = False  # whether the previous epoch's point is on the line
    radius = 3.2 if len(epochs) <= 60 else 2.0
    for i, (epoch, point) in enumerate(zip(epochs, series.points)):
        value = point.value
        if value is None or y is None:
            joined = False
            continue
        hover = escape(f"{series.name}, epoch {epoch}: {value:.4g}" + (f"; {point.note}" if point.note else ""))
        if y.on_scale(value):
            at = y(value)
            path.append(f"{'L' if joined else 'M'}{x[i]:.1f} {at:.1f}")
            joined = True
            marks.append(
                f'<circle data-epoch="{epoch}" cx="{x[i]:.1f}" cy="{at:.1f}" r="{radius}">'
                f"<title>{hover}</title></circle>"
            )
            continue
        joined = False
        if math.isfinite(value):  # 0 or below on a log axis: at the bottom edge
            marks.append(
                f'<circle class="off-scale" data-epoch="{epoch}" cx="{x[i]:.1f}" cy="{area.bottom}" r="{radius + 1}">'
                f"<title>{hover} (below the log axis)</title></circle>"
            )
        else:
            size = radius + 2
            marks.append(
                f'<path class="nonfinite" data-epoch="{epoch}" d="M{x[i] - size:.1f} {area.top - size:.1f}'
                f'l{2 * size:.1f} {2 * size:.1f}m0 {-2 * size:.1f}l{-2 * size:.1f} {2 * size:.1f}">'
                f"<title>{hover}</title></path>"
            )
    dash = f' stroke-dasharray="{series.dash}"' if series.dash else ""
    return (
        f'<g class="series" data-series="{escape(series.name)}" stroke="{series.color}" fill="{series.color}">'
        f"<title>{escape(series.name)}</title>"
        f'<path class="line" d="{" ".join(path)}"{dash}/>' + "".join(marks) + "</g>"
    )


#: Line colours (matplotlib's tab10, which the PNG uses too), then the same colours dashed.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
DASHES = ("", "7 3", "2 3", "9 3 2 3")


def style(index: int) -> tuple[str, str]:
    """The colour and dash pattern of the ``index``-th series: red is left for NaN/Inf."""
    return PALETTE[index % len(PALETTE)], DASHES[index // len(PALETTE) % len(DASHES)]


#: The charts' look, for the page's <style>: classes rather than attributes, so one place sets it.
CSS = """
svg.chart { width: 100%; height: auto; font: 12px system-ui, sans-serif; }
svg.chart .chart-title { font-size: 14px; font-weight: 600; fill: #222; }
svg.chart .plot { fill: #fff; stroke: #bbb; }
svg.chart .grid { stroke: #e6e6e6; }
svg.chart .tick { stroke: #888; }
svg.chart .tick-label, svg.chart .axis-label { fill: #444; }
svg.chart .empty { fill: #888; font-style: italic; }
svg.chart .band rect { opacity: 0.85; }
svg.chart .band-label { font-size: 10px; fill: #222; }
svg.chart .note { font-size: 10px; fill: #d95f02; }
svg.chart .change { stroke: #999; stroke-dasharray: 2 3; }
svg.chart .series .line { fill: none; stroke-width: 1.8; }
svg.chart .series:hover .line { stroke-width: 3.5; }
svg.chart .series .off-scale { fill: #fff; stroke-width: 1.5; }
svg.chart .series .nonfinite { fill: none; stroke: #d62728; stroke-width: 2.5; }
"""
