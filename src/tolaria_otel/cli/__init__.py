"""The ``tolaria-otel`` command line.

``tolaria-otel demo`` trains a small seeded network with the feature on (``tolaria_otel.demo``);
``tolaria-otel doctor`` shows and checks the configuration a training run would use;
``tolaria-otel assets DIR`` writes the collector configs, rules, dashboards and docs (``tolaria_otel.assets``).
They check their input before any work and report bad input as one line on stderr with a non-zero status:
2 for bad input, 1 for problems ``doctor`` found, 130 for a run stopped by Ctrl-C.

argparse rather than click or typer: it is in the standard library, so the command line adds
nothing to the core install, and it is the convention of ``python -m`` tools.
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import os
import socket
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NoReturn, TypeVar

from .. import provider as otel
from .._version import __version__
from ..provider import ConfigurationError
from ..redaction import HEADER_VARIABLES, MASK, redact, redacted_url, secrets_in
from ..volume import trainer_series
from ..settings import (
    ENV_COMPACT,
    ENV_ENABLED,
    ENV_EXPORT_RANK,
    ENV_HOST_NORM,
    ENV_MAX_SEEDS,
    ENV_SAMPLE_EVERY,
    ENV_STEP_NORM_HISTOGRAM,
    ENV_TENSOR_EXPLODING_ABOVE,
    ENV_TENSOR_VANISHING_BELOW,
    ENV_TOP_K,
    MAX_SEEDS_MAX,
    TOP_K_MAX,
    SeedLayerSettings,
    SettingsError,
    echoed,
)

T = TypeVar("T")

PROG = "tolaria-otel"
PROBE_TIMEOUT_S = 2.0
#: Above this an OTLP timeout is most likely meant as milliseconds (the specification's unit).
OTLP_TIMEOUT_PLAUSIBLE_S = 60.0
#: Characters of a value ``doctor`` shows; a longer one is cut.
SHOWN_MAX = 60
#: Where OTLP/HTTP receivers take metrics, tried when an endpoint answers with a client error.
KNOWN_OTLP_PATHS = {
    "/v1/metrics": "an OpenTelemetry Collector",
    "/opentelemetry/v1/metrics": "VictoriaMetrics",
    "/api/v1/otlp/v1/metrics": "Prometheus 3 with its OTLP receiver",
    "/otlp/v1/metrics": "Grafana Mimir",
}

#: The settings field each TOLARIA_* variable sets (for the defaults ``doctor`` shows).
TOLARIA_FIELDS = {
    ENV_ENABLED: "enabled",
    ENV_TOP_K: "top_k",
    ENV_COMPACT: "compact",
    ENV_SAMPLE_EVERY: "sample_every",
    ENV_EXPORT_RANK: "export_rank",
    ENV_HOST_NORM: "host_norm",
    ENV_MAX_SEEDS: "max_seeds",
    ENV_STEP_NORM_HISTOGRAM: "step_norm_histogram",
    ENV_TENSOR_VANISHING_BELOW: "tensor_vanishing_below",
    ENV_TENSOR_EXPLODING_ABOVE: "tensor_exploding_above",
}

#: The OTEL_* variables that shape this package's export, with the default each falls back to.
OTEL_DEFAULTS = {
    "OTEL_SDK_DISABLED": "false",
    "OTEL_METRICS_EXPORTER": "otlp",
    "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
    "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_ENDPOINT": "http://localhost:4318 (grpc: http://localhost:4317)",
    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "OTEL_EXPORTER_OTLP_ENDPOINT + /v1/metrics (grpc: as is)",
    "OTEL_EXPORTER_OTLP_HEADERS": "none",
    "OTEL_EXPORTER_OTLP_METRICS_HEADERS": "OTEL_EXPORTER_OTLP_HEADERS",
    "OTEL_EXPORTER_OTLP_TIMEOUT": "10 (seconds in the Python SDK)",
    "OTEL_EXPORTER_OTLP_METRICS_TIMEOUT": "OTEL_EXPORTER_OTLP_TIMEOUT",
    "OTEL_EXPORTER_OTLP_COMPRESSION": "none",
    "OTEL_EXPORTER_OTLP_METRICS_COMPRESSION": "OTEL_EXPORTER_OTLP_COMPRESSION",
    "OTEL_EXPORTER_OTLP_CERTIFICATE": "the system's CAs",
    "OTEL_EXPORTER_OTLP_METRICS_CERTIFICATE": "OTEL_EXPORTER_OTLP_CERTIFICATE",
    "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE": "none (no mutual TLS)",
    "OTEL_EXPORTER_OTLP_METRICS_CLIENT_CERTIFICATE": "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
    "OTEL_EXPORTER_OTLP_CLIENT_KEY": "none (no mutual TLS)",
    "OTEL_EXPORTER_OTLP_METRICS_CLIENT_KEY": "OTEL_EXPORTER_OTLP_CLIENT_KEY",
    "OTEL_METRIC_EXPORT_INTERVAL": "60000 (ms)",
    "OTEL_METRIC_EXPORT_TIMEOUT": "30000 (ms)",
    "OTEL_SERVICE_NAME": "tolaria",
    "OTEL_RESOURCE_ATTRIBUTES": "none",
    "OTEL_EXPORTER_PROMETHEUS_HOST": "localhost",
    "OTEL_EXPORTER_PROMETHEUS_PORT": "9464",
}
_ENDPOINT_VARIABLES = (otel.ENV_ENDPOINT, otel.ENV_METRICS_ENDPOINT)
_CLIENT_TLS_VARIABLES = (
    otel.ENV_CLIENT_CERTIFICATE,
    otel.ENV_METRICS_CLIENT_CERTIFICATE,
    otel.ENV_CLIENT_KEY,
    otel.ENV_METRICS_CLIENT_KEY,
)
_TLS_VARIABLES = (otel.ENV_CERTIFICATE, otel.ENV_METRICS_CERTIFICATE, *_CLIENT_TLS_VARIABLES)
#: The OTLP variables, each with the metrics-specific one that overrides it.
_OTLP_PAIRS = {
    otel.ENV_PROTOCOL: otel.ENV_METRICS_PROTOCOL,
    otel.ENV_ENDPOINT: otel.ENV_METRICS_ENDPOINT,
    otel.ENV_HEADERS: otel.ENV_METRICS_HEADERS,
    otel.ENV_TIMEOUT: otel.ENV_METRICS_TIMEOUT,
    otel.ENV_COMPRESSION: otel.ENV_METRICS_COMPRESSION,
    otel.ENV_CERTIFICATE: otel.ENV_METRICS_CERTIFICATE,
    otel.ENV_CLIENT_CERTIFICATE: otel.ENV_METRICS_CLIENT_CERTIFICATE,
    otel.ENV_CLIENT_KEY: otel.ENV_METRICS_CLIENT_KEY,
}


class CommandError(Exception):
    """Bad input: reported as one line, exit status 2."""


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


def run_assets_command(args: argparse.Namespace) -> int:
    from ..assets import AssetsError, write_assets

    try:
        written = write_assets(args.folder, force=args.force)
    except AssetsError as error:
        raise CommandError(str(error)) from None
    folders = sorted({path.parts[0] for path in written})
    print(f"wrote {len(written)} files to {args.folder}: {', '.join(folders)}")
    return 0


def run_plot_command(args: argparse.Namespace) -> int:
    try:
        from ..plot import render

        print(render(args.summaries, args.output or args.summaries.with_suffix(".png")))
    except (OSError, ValueError, ImportError) as error:
        raise CommandError(str(error)) from None
    return 0


def run_demo_command(args: argparse.Namespace) -> int:
    env = os.environ
    env.setdefault(ENV_ENABLED, "true")
    env.setdefault(ENV_HOST_NORM, "true")  # the demo shows every diagnostic
    _demo_exporter_defaults(env, args.otlp_endpoint)
    settings = _checked(lambda: SeedLayerSettings.from_env(env))
    if args.top_k is not None:
        settings = settings.replace(top_k=args.top_k)
    problems = otel.environment_problems(env)
    if problems:
        raise CommandError(str(problems[0]))
    exporters = otel.exporter_names(env)
    if settings.enabled and "otlp" in exporters and not otel.sdk_disabled(env):
        protocol = otel.otlp_protocol(env)
        # OTEL_EXPORTER_OTLP_METRICS_ENDPOINT takes a full URL as is, the way to give a store's path.
        setting = "--otlp-endpoint" if args.otlp_endpoint is not None else otel.ENV_METRICS_ENDPOINT
        problem = probe_otlp(
            otel.otlp_metrics_endpoint(env, protocol),
            protocol,
            otel.otlp_headers(env),
            otel.otlp_certificate(env),
            PROBE_TIMEOUT_S,
            setting,
            otel.otlp_client_certificate(env, protocol),
        )
        if problem:
            raise CommandError(problem)
    device = _device(args.device)
    if not args.quiet and importlib.util.find_spec("rich") is None:
        raise CommandError(
            "the demo's progress display needs rich: pip install 'tolaria-otel[demo]' (or run with --quiet)"
        )

    from .. import demo  # only the command that trains loads the training code

    options = demo.DemoOptions(epochs=args.epochs, seeds=args.seeds, seed=args.seed, device=device)
    provider = _checked(lambda: otel.configure_meter_provider(settings))
    try:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        out = args.output.open("w", encoding="utf-8")
    except OSError as error:
        provider.shutdown()
        raise CommandError(f"cannot write --output {str(args.output)!r}: {error.strerror or error}") from None
    with out:
        if not args.quiet:
            print(
                f"{args.seeds} seeds, {args.epochs} epochs x {options.steps} steps on {device}, seed {args.seed}; "
                f"top {settings.top_k} layers per seed; exporters: {', '.join(exporters) or 'none'}"
            )
            for url in otel.metrics_urls(provider):
                print(f"serving {url} while it trains")
            print(f"summaries: {args.output}")
        if not settings.enabled:
            print(
                f"{PROG} demo: {ENV_ENABLED} is off in the environment: no summaries are made or written",
                file=sys.stderr,
            )
        with demo.stop_on_interrupt() as stop_requested:
            if args.quiet:
                finished = demo.run_demo(options, settings, provider, out, demo.QuietDisplay(), stop_requested)
            else:
                with demo.RichDisplay(args.epochs, options.steps) as display:
                    finished = demo.run_demo(options, settings, provider, out, display, stop_requested)
    if finished < args.epochs:
        print(f"{PROG} demo: interrupted after {finished} finished epochs; summaries in {args.output}", file=sys.stderr)
        return 130
    print(args.output if args.quiet else f"wrote {finished} epochs to {args.output}")
    return 0


def run_doctor_command(args: argparse.Namespace) -> int:
    env = os.environ
    problems: list[str] = []
    good = {}
    for name in TOLARIA_FIELDS:  # one variable at a time, so that each bad one is reported
        try:
            SeedLayerSettings.from_env({name: env.get(name, "")})
            good[name] = env.get(name, "")
        except SettingsError as error:
            problems.append(str(error))
    settings = SeedLayerSettings.from_env(good)  # the bad ones at their defaults
    problems += [str(error) for error in otel.environment_problems(env)]
    in_force = _InForce.read(env)

    print(f"{PROG} {__version__}")
    defaults = SeedLayerSettings()
    rows = [(name, _format(getattr(defaults, field))) for name, field in TOLARIA_FIELDS.items()]
    for name, default in [*rows, *OTEL_DEFAULTS.items()]:
        raw = _value(env, name)
        where = "(default)" if raw is None else f"(env; default: {default})"
        unused = in_force.unused(name, settings)
        print(
            f"  {name:<40} {default if raw is None else _shown(name, raw)}  {where}"
            + (f"  not used: {unused}" if unused else "")
        )

    print(
        f"feature: {'on' if settings.enabled else 'off'}"
        + (", compact" if settings.compact else "")
        + f"; exporters: {', '.join(in_force.exporters) or 'none'}"
        + (f" ({in_force.protocol})" if "otlp" in in_force.exporters and in_force.protocol else "")
    )
    print(volume_estimate(settings, args.seeds, args.layers, in_force))
    problems += volume_problems(settings, args.seeds)
    if in_force.disabled:
        print(f"{otel.ENV_SDK_DISABLED}=true: nothing is exported")
    else:
        problems += _check_otlp(env, settings, in_force, args.timeout)
        problems += _check_pull_mode(env, in_force)

    # A second guard: a problem's text that comes from a library (an OSError) is masked too.
    secrets = secrets_in(env, fragments=False)
    for problem in problems:
        print(f"{PROG} doctor: {redact(problem, secrets)}", file=sys.stderr)
    print(f"{len(problems)} problem(s)" if problems else "all is well")
    return 1 if problems else 0


class _InForce:
    """What the OTEL_* settings in force choose, each part None where its variable is bad."""

    def __init__(self, disabled: bool, exporters: list[str], protocol: str | None, endpoint: str | None) -> None:
        self.disabled = disabled
        self.exporters = exporters
        self.protocol = protocol
        self.endpoint = endpoint

    @classmethod
    def read(cls, env: Mapping[str, str]) -> _InForce:
        disabled = _or_none(lambda: otel.sdk_disabled(env)) is True
        exporters = _or_none(lambda: otel.exporter_names(env)) or []
        protocol = _or_none(lambda: otel.otlp_protocol(env))
        endpoint = _or_none(lambda: otel.otlp_metrics_endpoint(env, protocol)) if protocol else None
        return cls(disabled, exporters, protocol, endpoint)

    def unused(self, name: str, settings: SeedLayerSettings) -> str | None:
        """Why the settings in force do not read ``name``, or None when they do."""
        env = os.environ
        if name in TOLARIA_FIELDS:
            return None if settings.enabled or name == ENV_ENABLED else f"{ENV_ENABLED} is off"
        if name == otel.ENV_SDK_DISABLED:
            return None
        if self.disabled:
            return f"{otel.ENV_SDK_DISABLED}=true"
        if name in _OTLP_PAIRS or name in _OTLP_PAIRS.values():
            if "otlp" not in self.exporters:
                return "no otlp exporter"
            if name in _OTLP_PAIRS and _value(env, _OTLP_PAIRS[name]) is not None:
                return f"{_OTLP_PAIRS[name]} is set"
            if name in _TLS_VARIABLES and not (self.endpoint or "").startswith("https:"):
                return "the endpoint is not https"
        if name in (otel.ENV_EXPORT_INTERVAL, otel.ENV_EXPORT_TIMEOUT) and not {"otlp", "console"} & set(
            self.exporters
        ):
            return "no periodic exporter (otlp, console)"
        if name in (otel.ENV_PROMETHEUS_HOST, otel.ENV_PROMETHEUS_PORT) and "prometheus" not in self.exporters:
            return "no prometheus exporter"
        return None


def _check_otlp(env: Mapping[str, str], settings: SeedLayerSettings, in_force: _InForce, timeout: float) -> list[str]:
    """The OTLP checks beyond the values' syntax: a timeout meant as ms, and the endpoint's answer."""
    if "otlp" not in in_force.exporters or in_force.protocol is None:
        return []
    problems = []
    seconds = _or_none(lambda: otel.otlp_timeout_s(env))
    if seconds is not None and seconds > OTLP_TIMEOUT_PLAUSIBLE_S:
        variable = otel.ENV_METRICS_TIMEOUT if _value(env, otel.ENV_METRICS_TIMEOUT) else otel.ENV_TIMEOUT
        problems.append(
            f"{variable}={echoed(env[variable])} is {seconds:g} seconds ({seconds / 60:,.0f} min) in the "
            "Python SDK, which reads seconds, not the specification's milliseconds: a down collector "
            "would hold every export and the final shutdown that long; expected seconds, e.g. 2"
        )
    if in_force.endpoint is None:
        return problems
    shown = redacted_url(in_force.endpoint)
    if not settings.enabled:
        print(f"OTLP endpoint: {shown} ({in_force.protocol}): not checked: {ENV_ENABLED} is off, nothing is exported")
        return problems
    headers = _or_none(lambda: otel.otlp_headers(env))
    certificate = _or_none(lambda: otel.otlp_certificate(env))
    certificate_set = _value(env, otel.ENV_METRICS_CERTIFICATE) or _value(env, otel.ENV_CERTIFICATE)
    client = _or_none(lambda: otel.otlp_client_certificate(env, in_force.protocol))
    client_bad = client is None and any(_value(env, name) for name in _CLIENT_TLS_VARIABLES)
    if headers is None or (
        in_force.endpoint.startswith("https:") and ((certificate_set and certificate is None) or client_bad)
    ):
        print(f"OTLP endpoint: {shown} ({in_force.protocol}): not checked: its headers or TLS files are not valid")
        return problems
    problem = probe_otlp(
        in_force.endpoint, in_force.protocol, headers, certificate, timeout, otel.ENV_METRICS_ENDPOINT, client
    )
    print(f"OTLP endpoint: {shown} ({in_force.protocol}): {'does not work (below)' if problem else 'answers'}")
    return [*problems, *([problem] if problem else [])]


def _check_pull_mode(env: Mapping[str, str], in_force: _InForce) -> list[str]:
    """Whether pull mode can listen where it is told to: by listening there, as a run would, and stopping."""
    address = _or_none(lambda: otel.prometheus_address(env))
    if "prometheus" not in in_force.exporters or address is None:
        return []
    if importlib.util.find_spec("opentelemetry.exporter.prometheus") is None:
        return []  # reported with the other problems of the environment
    try:
        reader = otel.prometheus_reader(env)
    except ConfigurationError as error:
        return [str(error)]
    reader.shutdown()
    print(f"pull mode: can listen on {address[0]} port {address[1]}")
    return []


def volume_estimate(settings: SeedLayerSettings, seeds: int, layers: int, in_force: _InForce) -> str:
    """The series one trainer exports (``volume.trainer_series``, which tests/test_volume.py checks against
    real stores), per seed and per trainer, and the samples they make: every series is repeated at every
    export (gauges of the latest epoch, a cumulative histogram)."""
    if not settings.enabled:
        return f"volume for {seeds} seeds: none ({ENV_ENABLED} is off)"
    series = trainer_series(settings, seeds, layers)
    total = sum(series.values())
    exported = min(seeds, settings.max_seeds)
    per_layer = series.get("tolaria_grad_agg_seed_layer_norm", 0) // exported
    histogram = sum(count for name, count in series.items() if "_step_norm_" in name) // exported
    seed_totals = 2 + int(settings.host_norm)  # norm, norm_max (and host_ratio)
    trainer = 2 + int(settings.host_norm)  # info, series_budget (and host_norm)
    layers_text = (
        f"2 x {per_layer} per-layer (top {settings.top_k} of {layers} layers)"
        if settings.emits_layers
        else "no per-layer (compact)"
    )
    histogram_text = (
        f"{histogram} step_norm histogram ({settings.step_norm_histogram})"
        if histogram
        else "no step_norm histogram (off)"
    )
    text = (
        f"volume for {seeds} seeds of {layers} layers: {total} series = {exported} exported seeds x "
        f"{2 * per_layer + seed_totals + histogram} ({layers_text}, {seed_totals} seed totals, {histogram_text}) "
        f"+ {trainer} per trainer"
    )
    pushed = {"otlp", "console"} & set(in_force.exporters)
    interval_ms = _or_none(lambda: otel.export_interval_ms(os.environ))
    if pushed and interval_ms is not None:
        text += f"; every {interval_ms / 1000:g} s: {total * 1000 / interval_ms:,.2f} samples per second"
    if "prometheus" in in_force.exporters:
        text += "; at every scrape" if not pushed else "; pull mode: at every scrape"
    return text


def volume_problems(settings: SeedLayerSettings, seeds: int) -> list[str]:
    """Seeds a trainer would leave out of its export (it warns once at run time too)."""
    if not settings.enabled or seeds <= settings.max_seeds:
        return []
    return [
        f"--seeds {seeds} is above {ENV_MAX_SEEDS}={settings.max_seeds}: {seeds - settings.max_seeds} seeds "
        f"would not be exported (the last by seed id); raise {ENV_MAX_SEEDS} to export them"
    ]


def probe_otlp(
    endpoint: str,
    protocol: str,
    headers: Mapping[str, str],
    certificate: str | None,
    timeout: float,
    setting: str,
    client: tuple[str, str] | None = None,
) -> str | None:
    """None when the endpoint answers as a receiver would; otherwise why not and what to try, in one line.

    OTLP/HTTP gets an empty export request (a valid, empty protobuf message) with the export's
    headers, and user info in the URL as HTTP basic auth (as the exporter's ``requests`` sends it),
    so a wrong path or a refused token shows up too; over ``https`` it trusts ``certificate`` (a CA file, or
    the system's CAs) and shows ``client`` (certificate and key files) as the exporter does, so a receiver
    that requires mutual TLS answers too. gRPC gets a TCP connection. ``setting`` is where the user sets
    the endpoint, for the advice.
    """
    shown = redacted_url(endpoint)
    parts = urllib.parse.urlsplit(endpoint)
    try:
        if protocol == "grpc":
            socket.create_connection((parts.hostname, parts.port or 4317), timeout=timeout).close()
            return None
        context = _tls_context(certificate, client) if parts.scheme == "https" else None
        status = _post_empty_export(endpoint, headers, context, timeout)
    except (OSError, ssl.SSLError) as error:
        reason = error.reason if isinstance(error, urllib.error.URLError) else error
        return f"OTLP endpoint {shown} does not answer: {reason}"
    if status is None:
        return None
    if status[0] in (401, 403):
        return (
            f"OTLP endpoint {shown} answered HTTP {status[0]} {status[1]}: the receiver refused the "
            f"credentials; check {otel.ENV_HEADERS} (or the URL's user info)"
        )
    tail = ""
    if 400 <= status[0] < 500:
        found = _answering_path(endpoint, headers, context, timeout)
        if found:
            alternative, what = found
            tail = f"; {redacted_url(alternative)} answers ({what}'s OTLP path): try {_set(setting, alternative)}"
        else:
            tail = (
                f": no OTLP/HTTP metrics receiver at that path; try the receiver's full URL in {setting} "
                "(a Collector: http://HOST:4318/v1/metrics; VictoriaMetrics: http://HOST:8428/opentelemetry/v1/metrics)"
            )
    return f"OTLP endpoint {shown} answered HTTP {status[0]} {status[1]}{tail}"


def _tls_context(certificate: str | None, client: tuple[str, str] | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=certificate)
    if client is not None:
        context.load_cert_chain(*client)
    return context


def _post_empty_export(
    endpoint: str, headers: Mapping[str, str], context: ssl.SSLContext | None, timeout: float
) -> tuple[int, str] | None:
    """POST an empty export request: None on success, else (HTTP status, reason). Raises OSError."""
    parts = urllib.parse.urlsplit(endpoint)
    sent = {**headers, "Content-Type": "application/x-protobuf"}
    if parts.username is not None or parts.password is not None:
        # urllib would take "user:pass@host" for the host; requests (the exporter) sends basic auth.
        credentials = f"{urllib.parse.unquote(parts.username or '')}:{urllib.parse.unquote(parts.password or '')}"
        sent["Authorization"] = "Basic " + base64.b64encode(credentials.encode("latin-1", "replace")).decode()
        endpoint = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
    request = urllib.request.Request(endpoint, data=b"", method="POST", headers=sent)
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context):
            return None
    except urllib.error.HTTPError as error:
        return error.code, str(error.reason)


def _answering_path(
    endpoint: str, headers: Mapping[str, str], context: ssl.SSLContext | None, timeout: float
) -> tuple[str, str] | None:
    """A well-known OTLP path on the same server that takes an empty export, with whose path it is."""
    parts = urllib.parse.urlsplit(endpoint)
    for path, what in KNOWN_OTLP_PATHS.items():
        if path == parts.path:
            continue
        candidate = parts._replace(path=path, query="", fragment="").geturl()
        try:
            if _post_empty_export(candidate, headers, context, timeout) is None:
                return candidate, what
        except OSError:
            return None
    return None


def _set(setting: str, url: str) -> str:
    return f"--otlp-endpoint {redacted_url(url)}" if setting.startswith("--") else f"{setting}={redacted_url(url)}"


def _demo_exporter_defaults(env: os._Environ[str], otlp_endpoint: str | None) -> None:
    """The demo needs no server unless asked: with no exporter and no OTLP endpoint set, ``none``."""
    if otlp_endpoint is not None:
        problem = otel.url_problem(otlp_endpoint.strip())
        if problem:
            raise CommandError(
                f"--otlp-endpoint {echoed(redacted_url(otlp_endpoint))} is not valid: {problem}; "
                "expected http://host:port (a Collector) or the full URL a store takes"
            )
        otlp_endpoint = otlp_endpoint.strip()
        if urllib.parse.urlsplit(otlp_endpoint).path in ("", "/"):
            otlp_endpoint = f"{otlp_endpoint.removesuffix('/')}/v1/metrics"
        names = _checked(lambda: otel.exporter_names(env)) if _value(env, otel.ENV_EXPORTER) else []
        env[otel.ENV_EXPORTER] = ",".join(dict.fromkeys([*names, "otlp"]))
        env[otel.ENV_METRICS_ENDPOINT] = otlp_endpoint
        env[otel.ENV_METRICS_PROTOCOL] = "http/protobuf"
    elif not any(_value(env, name) for name in (otel.ENV_EXPORTER, *_ENDPOINT_VARIABLES)):
        env[otel.ENV_EXPORTER] = "none"


def _device(raw: str) -> str:
    import torch

    try:
        device = torch.device(raw)
    except RuntimeError:
        raise CommandError(f"--device {echoed(raw)} is not valid: expected cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return "cpu"
    if device.type != "cuda":
        raise CommandError(f"--device {echoed(raw)} is not supported: expected cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise CommandError(f"--device {raw}: CUDA is not available here (torch {torch.__version__})")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise CommandError(f"--device {raw}: there are {torch.cuda.device_count()} CUDA devices")
    return str(device)


def _checked(build: Callable[[], T]) -> T:
    """``build()``, with the package's configuration errors turned into one-line command errors."""
    try:
        return build()
    except ValueError as error:  # SettingsError and ConfigurationError
        raise CommandError(str(error)) from None


def _or_none(read: Callable[[], T]) -> T | None:
    """``read()``, or None where the value is bad (reported on its own)."""
    try:
        return read()
    except ConfigurationError:
        return None


def _value(env: Mapping[str, str], name: str) -> str | None:
    """The variable's value; empty or blank counts as unset, as the OpenTelemetry specification says."""
    raw = env.get(name)
    return raw if raw is not None and raw.strip() else None


def _shown(name: str, raw: str) -> str:
    """A value as ``doctor`` prints it: header values and URL secrets masked, long values cut."""
    if name in HEADER_VARIABLES:
        # The names as the exporter will send them (parsed as it parses them), and only from a valid list: in
        # an invalid one, what looks like a name may be the end of a value ('authorization=Basic X,Y==').
        headers = _or_none(lambda: otel.otlp_headers({name: raw}))
        if headers is None:
            return f"{MASK} (not valid, not shown)"
        text = ",".join(f"{header}={MASK}" for header in headers) or MASK
    else:
        text = redacted_url(raw) if name in _ENDPOINT_VARIABLES else raw
    return text if len(text) <= SHOWN_MAX else f"{text[:SHOWN_MAX]}... ({len(text)} characters)"


def _format(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        text = raw.strip()
        if (
            not (text.isascii() and text.isdigit() and len(text.lstrip("0")) <= len(str(high)))
            or not low <= int(text) <= high
        ):
            raise argparse.ArgumentTypeError(f"{echoed(raw)} is not valid: expected an integer from {low} to {high}")
        return int(text)

    return parse


def _float_in(low: float, high: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            value = float("nan")
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{echoed(raw)} is not valid: expected a number from {low:g} to {high:g}")
        return value

    return parse
