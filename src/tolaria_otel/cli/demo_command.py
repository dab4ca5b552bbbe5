"""``tolaria-otel demo``: check the options and the environment, then train (``tolaria_otel.demo``).

Every check runs before any training: the settings, the exporters' variables, the OTLP endpoint (probed),
the device and the progress display's extra. The training code and torch load only after them.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import urllib.parse

from ..config import otel_env as otel
from ..config.environment import ENDPOINT_VARIABLES, echoed
from ..config.environment import value as env_value
from ..config.redaction import redacted_url
from ..config.settings import ENV_ENABLED, ENV_HOST_NORM, SeedLayerSettings
from ..export.provider import configure_meter_provider, metrics_urls
from .common import PROG, CommandError, checked
from .otlp_probe import PROBE_TIMEOUT_S, probe_otlp


def run_demo_command(args: argparse.Namespace) -> int:
    env = os.environ
    env.setdefault(ENV_ENABLED, "true")
    env.setdefault(ENV_HOST_NORM, "true")  # the demo shows every diagnostic
    _demo_exporter_defaults(env, args.otlp_endpoint)
    settings = checked(lambda: SeedLayerSettings.from_env(env))
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

    from ..demo import run as demo  # only the command that trains loads the training code

    options = demo.DemoOptions(epochs=args.epochs, seeds=args.seeds, seed=args.seed, device=device)
    provider = checked(lambda: configure_meter_provider(settings))
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
            for url in metrics_urls(provider):
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
        names = checked(lambda: otel.exporter_names(env)) if env_value(env, otel.ENV_EXPORTER) else []
        env[otel.ENV_EXPORTER] = ",".join(dict.fromkeys([*names, "otlp"]))
        env[otel.ENV_METRICS_ENDPOINT] = otlp_endpoint
        env[otel.ENV_METRICS_PROTOCOL] = "http/protobuf"
    elif not any(env_value(env, name) for name in (otel.ENV_EXPORTER, *ENDPOINT_VARIABLES)):
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
