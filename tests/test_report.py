"""``tolaria-otel report`` (one self-contained HTML page) and the PNG plot, on real training runs.

Two runs: the demo's (``tolaria_otel.demo.run.run_demo``, what ``tolaria-otel demo`` runs: four seeds through
their stages, one culled and so not measured for an epoch), and a short one made here whose seed has a
layer that leaves the top-K and comes back, a layer that gets no gradient for an epoch (not measured: a gap)
and an id and a layer name that need escaping in HTML, and in matplotlib too. A hand-written set of lines (no
code under test writes it) has a layer absent from ``layers`` for an epoch, between runs of two epochs, and
the ``max_step`` fields a newer writer adds.

The page is opened in a real headless Chromium, as a user would (``make backends`` installs Debian's
``chromium``): its screenshot must be a drawn image, and its rendered DOM must hold every seed id and layer
name as text, escaped names as the names themselves, and the gaps as breaks in each series' path.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
from collections import defaultdict
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import torch
from matplotlib.image import imread
from opentelemetry.sdk.metrics import MeterProvider
from torch import nn

from tolaria_otel import SeedLayerSettings, SeedLayerTelemetry
from tolaria_otel.cli import main
from tolaria_otel.cli.plot import draw, render
from tolaria_otel.cli.report import build_report
from tolaria_otel.demo import run as demo
from tolaria_otel.demo.seeded_mlp import SeedRegistry

ODD_SEED = 'seed <b>"0"</b> & co'
ODD_LAYER = "<script>alert('x')</script> & \"$x^$\""  # also mathtext to matplotlib, were it not escaped
STEADY, QUIET = "steady", "quiet"
STEPS = 4
CHROMIUM_TIMEOUT_S = 90

# -- the runs -------------------------------------------------------------------------------------------


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five epochs of the demo: seed-1 is culled (not measured) at epoch 4."""
    path = tmp_path_factory.mktemp("demo") / "run.jsonl"
    settings = SeedLayerSettings(enabled=True, host_norm=True)
    with path.open("w", encoding="utf-8") as out:
        finished = demo.run_demo(
            demo.DemoOptions(epochs=5), settings, MeterProvider(), out, demo.QuietDisplay(), lambda: False
        )
    assert finished == 5
    return path


class Host(nn.Module):
    """A stem, a seed of three parallel layers added to its output, a head."""

    def __init__(self, seed: nn.ModuleDict) -> None:
        super().__init__()
        self.stem = nn.Linear(32, 16)
        self.seed = seed
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        for layer in self.seed.values():
            h = h + 0.5 * layer(h)
        return self.head(h)


@pytest.fixture(scope="module")
def odd_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three epochs, top-1, clipped: ODD_LAYER's gradient x50 at epochs 0 and 2 and STEADY's at epoch 1 (so
    ODD_LAYER leaves the top-K for epoch 1 and comes back), and QUIET without a gradient at epoch 1."""
    torch.manual_seed(0)
    seed = nn.ModuleDict({STEADY: nn.Linear(16, 16), ODD_LAYER: nn.Linear(16, 16), QUIET: nn.Linear(16, 16)})
    model = Host(seed)
    registry = SeedRegistry()
    registry.add(ODD_SEED, seed, "SEED_STAGE_TRAINING")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    settings = SeedLayerSettings(enabled=True, top_k=1)
    provider = MeterProvider()
    telemetry = SeedLayerTelemetry(model, registry, settings=settings, meter_provider=provider)
    telemetry.attach(optimizer)
    data = torch.Generator().manual_seed(0)
    path = tmp_path_factory.mktemp("odd") / "run.jsonl"
    try:
        with path.open("w", encoding="utf-8") as out:
            for epoch in range(3):
                if epoch == 2:
                    registry.stages[ODD_SEED] = "SEED_STAGE_BLENDING"
                loss_sum = 0.0
                for _ in range(STEPS):
                    x = torch.randn(16, 32, generator=data)
                    loss = nn.functional.cross_entropy(model(x), torch.randint(0, 10, (16,), generator=data))
                    loss.backward()
                    boosted = seed[STEADY if epoch == 1 else ODD_LAYER]
                    for p in boosted.parameters():
                        p.grad.mul_(50.0)
                    if epoch == 1:
                        for p in seed[QUIET].parameters():
                            p.grad = None
                    telemetry.clip_grad_norm_(model.parameters(), max_norm=1.0)
                    optimizer.step()
                    optimizer.zero_grad()
                    loss_sum += loss.item()
                summary = telemetry.end_epoch()
                assert summary is not None
                out.write(json.dumps({**summary.to_dict(), "loss": loss_sum / STEPS}) + "\n")
    finally:
        telemetry.close()
        provider.shutdown()
    lines = read_lines(path)
    # What the run is for, read from the lines themselves.
    tops = [[layer["layer"] for layer in line["seeds"][0]["top_layers"]] for line in lines]
    assert tops == [[ODD_LAYER], [STEADY], [ODD_LAYER]]
    assert [line["seeds"][0]["layers"][QUIET] is None for line in lines] == [False, True, False]
    assert all(line["min_clip_factor"] is not None for line in lines)
    return path


def hand_written_line(epoch: int, layers: dict[str, float], top: str) -> dict[str, Any]:
    """One EpochSummary.to_dict() line, spelled out here: one seed, top-1, with the newer max_step fields."""
    return {
        "epoch": epoch,
        "sampled_steps": 10,
        "top_k": 1,
        "host_norm": None,
        "seeds": [
            {
                "seed_id": "s",
                "stage": "SEED_STAGE_TRAINING",
                "sampled_steps": 10,
                "total_norm": 1.0,
                "max_norm": 2.0,
                "max_step": 100 + epoch,
                "layer_count": len(layers),
                "top_layers": [{"layer": top, "value": layers[top], "max": 3.0, "max_step": 200 + epoch}],
                "layers": layers,
            }
        ],
        "clip_steps": 0,
        "clipped_steps": 0,
        "min_clip_factor": None,
    }


@pytest.fixture
def hand_written(tmp_path: Path) -> Path:
    """Layer "b" is absent from epoch 2's line (not a null: no key at all); "a" is there throughout."""
    lines = [
        hand_written_line(epoch, {"a": 0.5, **({} if epoch == 2 else {"b": 0.1 * (epoch + 1)})}, "a")
        for epoch in range(5)
    ]
    path = tmp_path / "hand.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


# -- Chromium -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Browser:
    executable: str
    profiles: Path

    def run(self, page: Path, *flags: str) -> str:
        """Chromium headless on the page with the flags; its stdout. The process and whatever it started are
        stopped before this returns, however it ends."""
        profile = self.profiles / f"profile-{len(list(self.profiles.iterdir()))}"
        command = [
            self.executable,
            "--headless",
            "--no-sandbox",  # as root, as in a CI container
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--window-size=1440,900",
            "--virtual-time-budget=5000",
            *flags,
            page.resolve().as_uri(),
        ]
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        try:
            stdout, stderr = process.communicate(timeout=CHROMIUM_TIMEOUT_S)
        finally:
            with contextlib.suppress(ProcessLookupError):  # gone already, with every process it started
                # Its own process group: the renderer and helper processes it started go with it.
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        assert process.returncode == 0, f"chromium exited with {process.returncode}: {stderr[-2000:]}"
        return stdout

    def screenshot(self, page: Path, png: Path) -> Path:
        self.run(page, f"--screenshot={png}")
        return png

    def dom(self, page: Path) -> str:
        return self.run(page, "--dump-dom")


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Browser:
    executable = shutil.which("chromium")
    if executable is None:
        pytest.fail("chromium is not installed: run `make backends` (devtools/fetch_chromium.sh installs it)")
    return Browser(executable, tmp_path_factory.mktemp("chromium"))


class Page(HTMLParser):
    """A rendered page, read back: its text, its tags, and each chart's series (marker epochs, path)."""

    def __init__(self, markup: str) -> None:
        super().__init__(convert_charrefs=True)
        self.text: list[str] = []
        self.tags: dict[str, int] = defaultdict(int)
        self.urls: list[str] = []
        #: (section heading, chart title, series name) -> {"epochs": [...], "d": path data}
        self.series: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.hovers: list[str] = []
        self._heading = ""
        self._in: list[str] = []
        self._chart = ""
        self._current: dict[str, Any] | None = None
        self.feed(markup)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {name: value or "" for name, value in attrs}
        self.tags[tag] += 1
        self._in.append(tag)
        self.urls += [value for name, value in attributes.items() if name in ("src", "href", "xlink:href")]
        if tag == "h2":
            self._heading = ""
        elif tag == "svg" and "chart" in attributes.get("class", ""):
            self._chart = attributes.get("aria-label", "")
        elif tag == "g" and attributes.get("class") == "series":
            self._current = {"epochs": [], "d": None}
            self.series[(self._heading, self._chart, attributes["data-series"])] = self._current
        elif self._current is not None and tag == "path" and attributes.get("class") == "line":
            self._current["d"] = attributes.get("d", "")
        elif self._current is not None and "data-epoch" in attributes:
            self._current["epochs"].append(int(attributes["data-epoch"]))

    def handle_endtag(self, tag: str) -> None:
        while self._in and self._in.pop() != tag:
            pass
        if tag == "g":
            self._current = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._in and self._in[-1] == "h2":
            self._heading += data
        if self._in and self._in[-1] == "title":
            self.hovers.append(data)


def runs_of(d: str) -> list[int]:
    """The points in each joined run of an SVG path of M and L commands."""
    runs: list[int] = []
    for command in d.split():
        if command.startswith("M"):
            runs.append(1)
        elif command.startswith("L"):
            runs[-1] += 1
    return runs


def assert_drawn(png: Path) -> None:
    pixels = imread(png)
    assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 200
    assert pixels[..., :3].std() > 0.05  # a blank (or single-colour) image has ~0
    assert (pixels[..., :3].mean(axis=2) < 0.5).mean() > 0.005  # some dark ink: axes, text, lines


# -- the HTML report ------------------------------------------------------------------------------------


def test_the_demo_report_opens_in_a_browser_with_every_seed_and_layer(
    demo_run: Path, browser: Browser, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report.html"
    assert main(["report", str(demo_run), "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    png = browser.screenshot(out, tmp_path / "report.png")
    assert imread(png).shape[:2] == (900, 1440)
    assert_drawn(png)

    page = Page(browser.dom(out))
    text = "".join(page.text)
    lines = read_lines(demo_run)
    for line in lines:
        for seed in line["seeds"]:
            assert seed["seed_id"] in text
            for layer in seed["layers"]:
                assert layer in text
    # Every layer of every seed has a series in its seed's RMS chart, with a marker at each epoch it has a value.
    for line in lines:
        for seed in line["seeds"]:
            for layer, value in seed["layers"].items():
                series = page.series[(seed["seed_id"], "Every layer: RMS per epoch", layer)]
                assert (line["epoch"] in series["epochs"]) == (value is not None)
    # The culled seed is not measured at epoch 4, its last: no point there, and the chart says so.
    culled = [s for line in lines for s in line["seeds"] if s["stage"] == "SEED_STAGE_CULLED"]
    assert [s["total_norm"] for s in culled] == [None]
    run_chart = "Seed totals: RMS (solid) and largest step (dashed)"
    assert 4 not in page.series[("Run", run_chart, culled[0]["seed_id"])]["epochs"]
    assert "not measured" in text
    # The loss the demo writes is charted, one point per epoch.
    assert page.series[("Run", "Training loss", "loss")]["epochs"] == [line["epoch"] for line in lines]
    assert page.tags["script"] == 0 and page.tags["link"] == 0 and page.tags["img"] == 0
    assert all(url.startswith("#") for url in page.urls), page.urls


def test_a_layer_out_of_the_top_k_keeps_its_line_and_a_gap_stays_a_gap(
    odd_run: Path, browser: Browser, tmp_path: Path
) -> None:
    out = tmp_path / "odd.html"
    out.write_text(build_report(odd_run), encoding="utf-8")
    page = Page(browser.dom(out))
    rms = "Every layer: RMS per epoch"
    largest = "Largest step per layer"
    # Out of the top-K at epoch 1: drawn there all the same, one run of three points.
    assert page.series[(ODD_SEED, rms, ODD_LAYER)]["epochs"] == [0, 1, 2]
    assert runs_of(page.series[(ODD_SEED, rms, ODD_LAYER)]["d"]) == [3]
    # Without a gradient at epoch 1: two single points, not joined across it.
    assert page.series[(ODD_SEED, rms, QUIET)]["epochs"] == [0, 2]
    assert runs_of(page.series[(ODD_SEED, rms, QUIET)]["d"]) == [1, 1]
    # Every layer's largest step is in the lines (layer_max), in the top-K or not; a gap stays a gap.
    assert page.series[(ODD_SEED, largest, ODD_LAYER)]["epochs"] == [0, 1, 2]
    assert page.series[(ODD_SEED, largest, QUIET)]["epochs"] == [0, 2]
    assert runs_of(page.series[(ODD_SEED, largest, QUIET)]["d"]) == [1, 1]
    # The clip factor and the loss: one point per epoch.
    clip = ("Run", "Clip factor: smallest per epoch (1: never scaled)", "smallest clip factor")
    assert page.series[clip]["epochs"] == [0, 1, 2]
    assert page.series[("Run", "Training loss", "loss")]["epochs"] == [0, 1, 2]


def test_names_are_escaped(odd_run: Path, browser: Browser, tmp_path: Path) -> None:
    html = build_report(odd_run)
    assert ODD_LAYER not in html and ODD_SEED not in html  # never raw markup
    assert "&lt;script&gt;alert(" in html and "seed &lt;b&gt;&quot;0&quot;&lt;/b&gt; &amp; co" in html
    out = tmp_path / "odd.html"
    out.write_text(html, encoding="utf-8")
    page = Page(browser.dom(out))
    assert page.tags["script"] == 0 and page.tags["b"] == 0  # the names made no elements
    text = "".join(page.text)
    assert ODD_LAYER in text and ODD_SEED in text  # and read as themselves
    assert any(hover.startswith(f"{ODD_LAYER}, epoch 1: ") for hover in page.hovers)


def test_an_absent_layer_is_a_gap_and_max_step_is_shown(hand_written: Path, browser: Browser) -> None:
    assert main(["report", str(hand_written)]) == 0  # written beside its input by default
    out = hand_written.with_suffix(".html")
    page = Page(browser.dom(out))
    series = page.series[("s", "Every layer: RMS per epoch", "b")]
    assert series["epochs"] == [0, 1, 3, 4]
    assert runs_of(series["d"]) == [2, 2]
    assert runs_of(page.series[("s", "Every layer: RMS per epoch", "a")]["d"]) == [5]
    assert any(hover.startswith("a, epoch 3: 3; step 203") for hover in page.hovers)  # the layer's largest step
    assert any("largest step (step 103)" in hover for hover in page.hovers)  # the seed's
    assert "2 at step 104" in "".join(page.text)  # the seed's table
    assert ("Run", "Training loss", "loss") not in page.series  # no loss in these lines: no loss chart


def test_the_page_references_no_url(demo_run: Path, odd_run: Path, hand_written: Path) -> None:
    for run in (demo_run, odd_run, hand_written):
        html = build_report(run)
        assert not re.search(r"(https?:)?//", html)  # no URL, protocol-relative ones included
        assert "<script" not in html and "<link" not in html and "url(" not in html


def test_report_rejects_a_bad_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bad.jsonl").write_text('{"epoch": 0}\n')
    assert main(["report", str(tmp_path / "bad.jsonl")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("tolaria-otel report: error:") and "bad.jsonl:1: not an EpochSummary" in error
    assert error.count("\n") == 1
    (tmp_path / "empty.jsonl").write_text("")
    assert main(["report", str(tmp_path / "empty.jsonl")]) == 2
    assert "no epoch summaries" in capsys.readouterr().err


# -- the PNG --------------------------------------------------------------------------------------------


@dataclass
class Drawn:
    rms: dict[str, list[float]] = field(default_factory=dict)
    largest: dict[str, list[float]] = field(default_factory=dict)


def panel_lines(figure: Any, title: str) -> Drawn:
    """The solid (RMS) and dashed (largest step) lines of the panel with that title, by their gid."""
    (ax,) = [ax for ax in figure.axes if ax.get_title() == title]
    drawn = Drawn()
    for line in ax.get_lines():
        if line.get_gid() is None:
            continue
        target = drawn.largest if line.get_linestyle() == "--" else drawn.rms
        target[line.get_gid()] = [float(v) for v in line.get_ydata()]
    return drawn


def same(a: list[float], b: list[float | None]) -> bool:
    return len(a) == len(b) and all(
        (math.isnan(x) and y is None) or (y is not None and math.isclose(x, y)) for x, y in zip(a, b)
    )


def test_the_png_draws_every_layer_with_gaps_as_gaps(odd_run: Path, tmp_path: Path) -> None:
    lines = read_lines(odd_run)
    figure = draw(odd_run)
    drawn = panel_lines(figure, f"{ODD_SEED}: every layer")
    seed_lines = [line["seeds"][0] for line in lines]
    assert set(drawn.rms) == set(seed_lines[0]["layers"]) == {STEADY, ODD_LAYER, QUIET}
    for layer, values in drawn.rms.items():
        assert same(values, [seed["layers"][layer] for seed in seed_lines]), layer
    assert math.isnan(drawn.rms[QUIET][1])  # no gradient at epoch 1: a NaN, which breaks the line
    for layer, values in drawn.largest.items():
        expected = [seed["layer_max"][layer] for seed in seed_lines]
        assert same(values, expected), layer
    totals = panel_lines(figure, "Seed totals")
    assert same(totals.rms[ODD_SEED], [seed["total_norm"] for seed in seed_lines])
    assert same(totals.largest[ODD_SEED], [seed["max_norm"] for seed in seed_lines])
    for title, key in (("Training loss", "loss"), ("Smallest clip factor (1: not scaled)", "min_clip_factor")):
        (ax,) = [ax for ax in figure.axes if ax.get_title() == title]
        assert same([float(v) for v in ax.get_lines()[0].get_ydata()], [line[key] for line in lines]), title
    # No title or legend is cut off: each lies inside the image.
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    width, height = figure.canvas.get_width_height()
    for ax in figure.axes:
        for artist in (ax.title, ax.get_legend()):
            if artist is not None and artist.get_visible():
                box = artist.get_window_extent(renderer)
                assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= width and box.y1 <= height, ax.get_title()
    out = render(odd_run, tmp_path / "odd.png")  # the $ in the names is no mathtext error
    assert_drawn(out)


def test_the_png_of_the_demo_draws_every_layer(demo_run: Path, tmp_path: Path) -> None:
    lines = read_lines(demo_run)
    figure = draw(demo_run)
    for seed_id in {seed["seed_id"] for line in lines for seed in line["seeds"]}:
        drawn = panel_lines(figure, f"{seed_id}: every layer")
        layers = {
            layer for line in lines for seed in line["seeds"] if seed["seed_id"] == seed_id for layer in seed["layers"]
        }
        assert set(drawn.rms) == layers
        for layer, values in drawn.rms.items():
            expected = [
                next((s["layers"].get(layer) for s in line["seeds"] if s["seed_id"] == seed_id), None) for line in lines
            ]
            assert same(values, expected), (seed_id, layer)
    assert_drawn(render(demo_run, tmp_path / "demo.png"))
