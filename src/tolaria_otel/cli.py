"""The ``tolaria-otel`` command line.

``tolaria-otel demo`` trains a small seeded network with the feature on (``tolaria_otel.demo``);
``tolaria-otel doctor`` shows and checks the configuration a training run would use. Both check
their input before any work and report bad input as one line on stderr with a non-zero status:
2 for bad input, 1 for problems ``doctor`` found, 130 for a run stopped by Ctrl-C.

argparse rather than click or typer: it is in the standard library, so the command line adds
nothing to the core install, and it is the convention of ``python -m`` tools.
"""

from __future__ import annotations

import argparse
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

from opentelemetry.util.re import parse_env_headers

from ._version import __version__
from .provider import ConfigurationError, exporter_names, otlp_protocol
from .settings import (
    ENV_COMPACT,
    ENV_ENABLED,
    ENV_EXPORT_RANK,
    ENV_SAMPLE_EVERY,
    ENV_TOP_K,
    TOP_K_MAX,
    SeedLayerSettings,
    SettingsError,
)

T = TypeVar("T")

PROG = "tolaria-otel"
PROBE_TIMEOUT_S = 2.0
EXPORT_INTERVAL_DEFAULT_MS = 60_000

#: The settings field each TOLARIA_* variable sets (for the defaults ``doctor`` shows).
TOLARIA_FIELDS = {ENV_ENABLED: "enabled", ENV_TOP_K: "top_k", ENV_COMPACT: "compact",
                  ENV_SAMPLE_EVERY: "sample_every", ENV_EXPORT_RANK: "export_rank"}

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
    "OTEL_METRIC_EXPORT_INTERVAL": "60000 (ms)",
    "OTEL_METRIC_EXPORT_TIMEOUT": "30000 (ms)",
    "OTEL_SERVICE_NAME": "tolaria",
    "OTEL_RESOURCE_ATTRIBUTES": "none",
    "OTEL_EXPORTER_PROMETHEUS_HOST": "localhost",
    "OTEL_EXPORTER_PROMETHEUS_PORT": "9464",
}
_SECRET_VARIABLES = ("OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_METRICS_HEADERS")
_ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")


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
        print(f"{PROG} {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before the demo's own handler is installed, or a second Ctrl-C
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Per-seed, per-layer gradient summaries on OpenTelemetry.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo", help="train a small seeded network with the feature on",
        description="Train a small host network with seeds grafted in, through a scripted lifecycle on "
        f"synthetic data, with the feature on unless {ENV_ENABLED} says otherwise. Summaries go to a JSON "
        "Lines file, one line per epoch. With no OTEL_METRICS_EXPORTER and no OTLP endpoint in the "
        "environment nothing is exported (OTEL_METRICS_EXPORTER=none); otherwise the OTEL_* variables "
        "apply. Ctrl-C stops at the next step, keeping every finished epoch.")
    demo.add_argument("--epochs", type=_int_in(1, 1000), default=6, help="epochs to train (default 6)")
    demo.add_argument("--seeds", type=_int_in(2, 4), default=4, help="seeds to grow, 2 to 4 (default 4)")
    demo.add_argument("--top-k", type=_int_in(1, TOP_K_MAX), help=f"layers kept per seed (default: {ENV_TOP_K})")
    demo.add_argument("--seed", type=_int_in(0, 2**32 - 1), default=0, help="random seed (default 0)")
    demo.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    demo.add_argument("--output", type=Path, default=Path("runs/demo.jsonl"),
                      help="JSON Lines file of the summaries (default runs/demo.jsonl)")
    demo.add_argument("--otlp-endpoint", metavar="URL",
                      help="export over OTLP/HTTP to this collector (http://host:4318; /v1/metrics is added "
                      "to a URL without a path)")
    demo.add_argument("--quiet", action="store_true", help="print only the output path")
    demo.set_defaults(handler=run_demo_command)

    doctor = commands.add_parser(
        "doctor", help="show and check the telemetry configuration",
        description="Print every TOLARIA_* and OTEL_* variable this package reads, where its value comes "
        "from and its default; validate them as a training run would; estimate the telemetry volume; "
        "check that the OTLP endpoint answers. Exit status 1, with one line per problem, when not all "
        "is well.")
    doctor.add_argument("--seeds", type=_int_in(1, 1000), default=4,
                        help="active seeds to estimate the volume for (default 4)")
    doctor.add_argument("--timeout", type=_float_in(0.1, 60.0), default=PROBE_TIMEOUT_S,
                        help=f"seconds to wait for the OTLP endpoint (default {PROBE_TIMEOUT_S:g})")
    doctor.set_defaults(handler=run_doctor_command)

    plot = commands.add_parser(
        "plot", help="render a run's summaries to a PNG",
        description="Render the main views of the dashboards (top-K layers per seed over epochs, per-seed "
        "totals) from a JSON Lines file of epoch summaries (the demo's --output) to a PNG, for a look "
        "without Grafana. Needs matplotlib: pip install 'tolaria-otel[plot]'.")
    plot.add_argument("summaries", type=Path, help="JSON Lines file, one EpochSummary.to_dict() per line")
    plot.add_argument("-o", "--output", type=Path, help="PNG to write (default: the input with .png)")
    plot.set_defaults(handler=run_plot_command)
    return parser


def run_plot_command(args: argparse.Namespace) -> int:
    try:
        from .plot import render

        print(render(args.summaries, args.output or args.summaries.with_suffix(".png")))
    except (OSError, ValueError, ImportError) as error:
        raise CommandError(str(error)) from None
    return 0


def run_demo_command(args: argparse.Namespace) -> int:
    env = os.environ
    env.setdefault(ENV_ENABLED, "true")
    _demo_exporter_defaults(env, args.otlp_endpoint)
    settings = _settings(env)
    if args.top_k is not None:
        settings = settings.replace(top_k=args.top_k)
    exporters = _checked(lambda: exporter_names(env))
    if "otlp" in exporters and not _is_true(env.get("OTEL_SDK_DISABLED", "")):
        protocol = _checked(lambda: otlp_protocol(env))
        problem = probe_otlp(otlp_metrics_endpoint(env, protocol), protocol, env, PROBE_TIMEOUT_S)
        if problem:
            raise CommandError(problem)
    device = _device(args.device)
    if not args.quiet and importlib.util.find_spec("rich") is None:
        raise CommandError("the demo's progress display needs rich: pip install 'tolaria-otel[demo]' "
                           "(or run with --quiet)")

    from . import demo  # only the command that trains loads the training code

    options = demo.DemoOptions(epochs=args.epochs, seeds=args.seeds, seed=args.seed, device=device)
    try:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        out = args.output.open("w", encoding="utf-8")
    except OSError as error:
        raise CommandError(f"cannot write --output {str(args.output)!r}: {error.strerror or error}") from None
    from .provider import configure_meter_provider

    with out:
        provider = _checked(lambda: configure_meter_provider(settings))
        if not args.quiet:
            print(f"{args.seeds} seeds, {args.epochs} epochs x {options.steps} steps on {device}, seed {args.seed}; "
                  f"top {settings.top_k} layers per seed; exporters: {', '.join(exporters) or 'none'}")
            print(f"summaries: {args.output}")
        if not settings.enabled:
            print(f"{PROG} demo: {ENV_ENABLED} is off in the environment: no summaries are made or written",
                  file=sys.stderr)
        with demo.stop_on_interrupt() as stop_requested:
            if args.quiet:
                finished = demo.run_demo(options, settings, provider, out, demo.QuietDisplay(), stop_requested)
            else:
                with demo.RichDisplay(args.epochs, options.steps) as display:
                    finished = demo.run_demo(options, settings, provider, out, display, stop_requested)
    if finished < args.epochs:
        print(f"{PROG} demo: interrupted after {finished} finished epochs; summaries in {args.output}",
              file=sys.stderr)
        return 130
    print(args.output if args.quiet else f"wrote {finished} epochs to {args.output}")
    return 0


def run_doctor_command(args: argparse.Namespace) -> int:
    env = os.environ
    problems: list[str] = []
    print(f"{PROG} {__version__}")
    defaults = SeedLayerSettings()
    rows = [(name, _format(getattr(defaults, field))) for name, field in TOLARIA_FIELDS.items()]
    for name, default in [*rows, *OTEL_DEFAULTS.items()]:
        raw = _value(env, name)
        where = "(default)" if raw is None else f"(env; default: {default})"
        print(f"  {name:<40} {default if raw is None else _redacted(name, raw)}  {where}")

    for name in TOLARIA_FIELDS:  # one variable at a time, so that each bad one is reported
        try:
            SeedLayerSettings.from_env({name: env.get(name, "")})
        except SettingsError as error:
            problems.append(str(error))
    settings = defaults if problems else SeedLayerSettings.from_env(env)
    try:
        exporters = exporter_names(env)
    except ConfigurationError as error:
        problems.append(str(error))
        exporters = []
    try:
        protocol: str | None = otlp_protocol(env)
    except ConfigurationError as error:
        problems.append(str(error))
        protocol = None
    interval_ms = _positive_number(env, "OTEL_METRIC_EXPORT_INTERVAL", EXPORT_INTERVAL_DEFAULT_MS, problems)
    _positive_number(env, "OTEL_METRIC_EXPORT_TIMEOUT", 30_000, problems)
    problems += _exporter_packages(exporters, protocol, env)

    print(f"feature: {'on' if settings.enabled else 'off'}" + (", compact" if settings.compact else "")
          + f"; exporters: {', '.join(exporters) or 'none'}")
    print(volume_estimate(settings, args.seeds, interval_ms))
    if _is_true(env.get("OTEL_SDK_DISABLED", "")):
        print("OTEL_SDK_DISABLED=true: nothing is exported")
    elif "otlp" in exporters and protocol is not None:
        endpoint = otlp_metrics_endpoint(env, protocol)
        problem = probe_otlp(endpoint, protocol, env, args.timeout)
        print(f"OTLP endpoint: {_redacted_url(endpoint)} ({protocol}): {'no answer' if problem else 'answers'}")
        problems += [problem] if problem else []

    for problem in problems:
        print(f"{PROG} doctor: {problem}", file=sys.stderr)
    print(f"{len(problems)} problem(s)" if problems else "all is well")
    return 1 if problems else 0


def volume_estimate(settings: SeedLayerSettings, seeds: int, interval_ms: float) -> str:
    """Series per export and points per hour: observable gauges repeat every series at every export."""
    if not settings.enabled:
        return f"volume for {seeds} seeds: none ({ENV_ENABLED} is off)"
    layer_series = settings.top_k * seeds if settings.emits_layers else 0
    series = layer_series + seeds
    per_hour = series * 3_600_000 / interval_ms
    return (f"volume for {seeds} seeds: {series} series per export ({layer_series} layer_norm = top_k "
            f"{settings.top_k} x {seeds} seeds, {seeds} seed.norm), every {interval_ms / 1000:g} s: "
            f"{per_hour:,.0f} points per hour")


def otlp_metrics_endpoint(env: Mapping[str, str], protocol: str) -> str:
    """The URL the SDK's OTLP metric exporter sends to, resolved the way the exporter does."""
    if endpoint := env.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "").strip():
        return endpoint
    if protocol == "grpc":
        return env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip() or "http://localhost:4317"
    base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip() or "http://localhost:4318"
    return f"{base.removesuffix('/')}/v1/metrics"


def probe_otlp(endpoint: str, protocol: str, env: Mapping[str, str], timeout: float) -> str | None:
    """None when the endpoint answers as a collector would; otherwise why not, in one line.

    OTLP/HTTP gets an empty export request (a valid, empty protobuf message) with the configured
    headers, so a wrong path or a refused token shows up too; gRPC gets a TCP connection.
    """
    shown = _redacted_url(endpoint)
    parts = urllib.parse.urlsplit(endpoint)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if parts.scheme not in ("http", "https") or not parts.hostname or port == -1:
        return f"OTLP endpoint {shown!r} is not valid: expected http://host:port or https://host:port"
    try:
        if protocol == "grpc":
            socket.create_connection((parts.hostname, port or 4317), timeout=timeout).close()
            return None
        headers = dict(parse_env_headers(_value(env, "OTEL_EXPORTER_OTLP_METRICS_HEADERS")
                                         or env.get("OTEL_EXPORTER_OTLP_HEADERS", ""), liberal=True))
        request = urllib.request.Request(endpoint, data=b"", method="POST",
                                         headers={**headers, "Content-Type": "application/x-protobuf"})
        cafile = _value(env, "OTEL_EXPORTER_OTLP_METRICS_CERTIFICATE") or _value(env, "OTEL_EXPORTER_OTLP_CERTIFICATE")
        context = ssl.create_default_context(cafile=cafile) if parts.scheme == "https" else None
        with urllib.request.urlopen(request, timeout=timeout, context=context):
            return None
    except urllib.error.HTTPError as error:
        return f"OTLP endpoint {shown} answered HTTP {error.code} {error.reason}"
    except urllib.error.URLError as error:
        return f"OTLP endpoint {shown} does not answer: {error.reason}"
    except (OSError, ssl.SSLError) as error:
        return f"OTLP endpoint {shown} does not answer: {error}"


def _demo_exporter_defaults(env: os._Environ[str], otlp_endpoint: str | None) -> None:
    """The demo needs no server unless asked: with no exporter and no OTLP endpoint set, ``none``."""
    if otlp_endpoint is not None:
        parts = urllib.parse.urlsplit(otlp_endpoint)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise CommandError(f"--otlp-endpoint {otlp_endpoint!r} is not valid: expected http://host:port")
        if parts.path in ("", "/"):
            otlp_endpoint = f"{otlp_endpoint.removesuffix('/')}/v1/metrics"
        names = _checked(lambda: exporter_names(env)) if _value(env, "OTEL_METRICS_EXPORTER") else []
        env["OTEL_METRICS_EXPORTER"] = ",".join(dict.fromkeys([*names, "otlp"]))
        env["OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"] = otlp_endpoint
        env["OTEL_EXPORTER_OTLP_METRICS_PROTOCOL"] = "http/protobuf"
    elif not any(_value(env, name) for name in ("OTEL_METRICS_EXPORTER", *_ENDPOINT_VARIABLES)):
        env["OTEL_METRICS_EXPORTER"] = "none"


def _settings(env: Mapping[str, str]) -> SeedLayerSettings:
    return _checked(lambda: SeedLayerSettings.from_env(env))


def _device(raw: str) -> str:
    import torch

    try:
        device = torch.device(raw)
    except RuntimeError:
        raise CommandError(f"--device {raw!r} is not valid: expected cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return "cpu"
    if device.type != "cuda":
        raise CommandError(f"--device {raw!r} is not supported: expected cpu, cuda or cuda:N")
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


def _exporter_packages(exporters: Sequence[str], protocol: str | None, env: Mapping[str, str]) -> list[str]:
    """What the chosen exporters need that is missing or malformed, as ``configure_meter_provider`` says it."""
    problems = []
    needs = []
    if "otlp" in exporters and protocol == "grpc":
        needs.append(("opentelemetry.exporter.otlp.proto.grpc", "OTLP over grpc", "grpc"))
    if "prometheus" in exporters:
        needs.append(("opentelemetry.exporter.prometheus", "OTEL_METRICS_EXPORTER=prometheus", "prometheus"))
        port = _value(env, "OTEL_EXPORTER_PROMETHEUS_PORT")
        if port is not None and not (port.strip().isdigit() and int(port) <= 65535):
            problems.append(f"OTEL_EXPORTER_PROMETHEUS_PORT={port!r} is not valid: expected a port from 0 to 65535")
    for module, what, extra in needs:
        if importlib.util.find_spec(module) is None:
            problems.append(f"{what} needs the exporter package: pip install 'tolaria-otel[{extra}]'")
    return problems


def _positive_number(env: Mapping[str, str], name: str, default: float, problems: list[str]) -> float:
    raw = _value(env, name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not value > 0:
        problems.append(f"{name}={raw!r} is not valid: expected a positive number of milliseconds")
        return default
    return value


def _value(env: Mapping[str, str], name: str) -> str | None:
    """The variable's value; empty or blank counts as unset, as the OpenTelemetry specification says."""
    raw = env.get(name)
    return raw if raw is not None and raw.strip() else None


def _redacted(name: str, raw: str) -> str:
    if name in _SECRET_VARIABLES:
        keys = parse_env_headers(raw, liberal=True)
        return ",".join(f"{key}=***" for key in keys) or "***"
    if name in _ENDPOINT_VARIABLES:
        return _redacted_url(raw)
    return raw


def _redacted_url(url: str) -> str:
    """The URL without a password in it (``https://user:secret@host`` is a valid endpoint)."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=f"{parts.username}:***@{parts.netloc.rpartition('@')[2]}").geturl()


def _format(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _is_true(raw: str) -> bool:
    return raw.strip().lower() == "true"


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        text = raw.strip()
        if not (text.isascii() and text.isdigit()) or not low <= int(text) <= high:
            raise argparse.ArgumentTypeError(f"{raw!r} is not valid: expected an integer from {low} to {high}")
        return int(text)

    return parse


def _float_in(low: float, high: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            value = float("nan")
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{raw!r} is not valid: expected a number from {low:g} to {high:g}")
        return value

    return parse
