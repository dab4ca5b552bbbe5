"""The ``tolaria-otel`` command line.

``tolaria-otel demo`` trains a small seeded network with the feature on (``tolaria_otel.demo``);
``tolaria-otel doctor`` shows and checks the configuration a training run would use;
``tolaria-otel plot`` renders a run's summaries to a PNG (``tolaria_otel.plot``);
``tolaria-otel report`` writes them as one self-contained HTML page (``report``, drawn by ``report_chart``);
``tolaria-otel assets DIR`` writes the collector configs, rules, dashboards and docs (``tolaria_otel.assets``).
They check their input before any work and report bad input as one line on stderr with a non-zero status:
2 for bad input, 1 for problems ``doctor`` found, 130 for a run stopped by Ctrl-C.

The parser and the dispatch live here; each command is a module of its own (``demo_command``,
``doctor_command`` with ``doctor_checks`` and ``doctor_variables``, ``plot_command``, ``report_command``
with ``report`` and ``report_chart``, ``assets_command``), and what two commands share is in ``common`` and
``otlp_probe``: commands never import one another.

argparse rather than click or typer: it is in the standard library, so the command line adds
nothing to the core install, and it is the convention of ``python -m`` tools.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from .._version import __version__
from ..config.environment import echoed, integer, number
from ..config.redaction import redact, secrets_in
from ..config.settings import ENV_ENABLED, ENV_HOST_NORM, ENV_TOP_K, MAX_SEEDS_MAX, TOP_K_MAX
from .assets_command import run_assets_command
from .common import PROG, CommandError
from .demo_command import run_demo_command
from .doctor_command import run_doctor_command
from .otlp_probe import PROBE_TIMEOUT_S
from .plot_command import run_plot_command
from .report_command import run_report_command


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (argparse's own print the whole usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except CommandError as error:
        message = redact(str(error), secrets_in(os.environ, fragments=False))  # a second guard, as in doctor
        print(f"{PROG} {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before the demo's own handler is installed, or a second Ctrl-C
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Per-seed, per-layer gradient summaries on OpenTelemetry.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="train a small seeded network with the feature on",
        description="Train a small host network with seeds grafted in, through a scripted lifecycle on "
        f"synthetic data, with the feature on unless {ENV_ENABLED} says otherwise, and the host measured "
        f"unless {ENV_HOST_NORM} says otherwise. Summaries go to a JSON "
        "Lines file, one line per epoch. With no OTEL_METRICS_EXPORTER and no OTLP endpoint in the "
        "environment nothing is exported (OTEL_METRICS_EXPORTER=none); otherwise the OTEL_* variables "
        "apply. Ctrl-C stops at the next step, keeping every finished epoch.",
    )
    demo.add_argument("--epochs", type=_int_in(1, 1000), default=6, help="epochs to train (default 6)")
    demo.add_argument("--seeds", type=_int_in(2, 4), default=4, help="seeds to grow, 2 to 4 (default 4)")
    demo.add_argument("--top-k", type=_int_in(1, TOP_K_MAX), help=f"layers kept per seed (default: {ENV_TOP_K})")
    demo.add_argument("--seed", type=_int_in(0, 2**32 - 1), default=0, help="random seed (default 0)")
    demo.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    demo.add_argument(
        "--output",
        type=Path,
        default=Path("runs/demo.jsonl"),
        help="JSON Lines file of the summaries (default runs/demo.jsonl)",
    )
    demo.add_argument(
        "--otlp-endpoint",
        metavar="URL",
        help="export over OTLP/HTTP to this receiver: http://host:4318 for a Collector "
        "(/v1/metrics is added to a URL without a path), or the full URL a store takes",
    )
    demo.add_argument("--quiet", action="store_true", help="print only the output path")
    demo.set_defaults(handler=run_demo_command)

    doctor = commands.add_parser(
        "doctor",
        help="show and check the telemetry configuration",
        description="Print every TOLARIA_* and OTEL_* variable this package reads, where its value comes "
        "from, its default and whether the settings in force use it; check each one in force as a "
        "training run would; estimate the telemetry volume; check that the OTLP endpoint answers (when "
        "the feature is on) and that pull mode can listen where it is told to. Exit status 1, with one "
        "line per problem, when not all is well.",
    )
    doctor.add_argument(
        "--seeds", type=_int_in(1, MAX_SEEDS_MAX), default=4, help="active seeds to estimate the volume for (default 4)"
    )
    doctor.add_argument(
        "--layers", type=_int_in(1, 1_000_000), default=3, help="layers per seed to estimate the volume for (default 3)"
    )
    doctor.add_argument(
        "--timeout",
        type=_float_in(0.1, 60.0),
        default=PROBE_TIMEOUT_S,
        help=f"seconds to wait for the OTLP endpoint (default {PROBE_TIMEOUT_S:g})",
    )
    doctor.set_defaults(handler=run_doctor_command)

    plot = commands.add_parser(
        "plot",
        help="render a run's summaries to a PNG",
        description="Render the main views of the dashboards (top-K layers per seed over epochs, per-seed "
        "totals) from a JSON Lines file of epoch summaries (the demo's --output) to a PNG, for a look "
        "without Grafana. Needs matplotlib: pip install 'tolaria-otel[plot]'.",
    )
    plot.add_argument("summaries", type=Path, help="JSON Lines file, one EpochSummary.to_dict() per line")
    plot.add_argument("-o", "--output", type=Path, help="PNG to write (default: the input with .png)")
    plot.set_defaults(handler=run_plot_command)

    report = commands.add_parser(
        "report",
        help="write a run's summaries as one self-contained HTML page",
        description="Write one HTML file from a JSON Lines file of epoch summaries (the demo's --output): every "
        "seed's total norm (RMS and largest step), the loss and the clip factor when the lines have them, and per "
        "seed every layer over the epochs (RMS and largest step; an epoch without the layer is a gap), its stages "
        "and a table of its epochs; values show on hover. Inline SVG and CSS only: it opens without a network "
        "and needs no extra.",
    )
    report.add_argument("summaries", type=Path, help="JSON Lines file, one EpochSummary.to_dict() per line")
    report.add_argument("-o", "--output", type=Path, help="HTML file to write (default: the input with .html)")
    report.set_defaults(handler=run_report_command)

    assets = commands.add_parser(
        "assets",
        help="write the collector configs, alert rules, dashboards and docs into a folder",
        description="Write the files around the package into DIR, laid out as in the repository: collector/ "
        "(OpenTelemetry Collector configs, Prometheus scrape config, alert rules and their promtool tests), "
        "dashboards/json and dashboards/provisioning (Grafana), docs/, docker-compose.yml and .env.example. "
        "The README's links are relative to DIR. A file that exists is not overwritten without --force.",
    )
    assets.add_argument("folder", type=Path, metavar="DIR", help="folder to write into (created if missing)")
    assets.add_argument("--force", action="store_true", help="overwrite files that exist")
    assets.set_defaults(handler=run_assets_command)
    return parser


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        parsed = integer(raw, low, high)
        if parsed is None:
            raise argparse.ArgumentTypeError(f"{echoed(raw)} is not valid: expected an integer from {low} to {high}")
        return parsed

    return parse


def _float_in(low: float, high: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        value = number(raw)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{echoed(raw)} is not valid: expected a number from {low:g} to {high:g}")
        return value

    return parse
