"""``doctor``'s checks beyond the values' syntax: the OTLP endpoint, pull mode, and the telemetry volume."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping

from ..config import otel_env as otel
from ..config.environment import echoed
from ..config.environment import value as env_value
from ..config.otel_env import ConfigurationError
from ..config.redaction import redacted_url
from ..config.settings import ENV_ENABLED, ENV_MAX_SEEDS, SeedLayerSettings
from ..export.provider import prometheus_reader
from ..export.volume import trainer_series
from .common import or_none
from .doctor_variables import CLIENT_TLS_VARIABLES, InForce
from .otlp_probe import probe_otlp

#: Above this an OTLP timeout is most likely meant as milliseconds (the specification's unit).
OTLP_TIMEOUT_PLAUSIBLE_S = 60.0


def check_otlp(env: Mapping[str, str], settings: SeedLayerSettings, in_force: InForce, timeout: float) -> list[str]:
    """The OTLP checks beyond the values' syntax: a timeout meant as ms, and the endpoint's answer."""
    if "otlp" not in in_force.exporters or in_force.protocol is None:
        return []
    problems = []
    seconds = or_none(lambda: otel.otlp_timeout_s(env))
    if seconds is not None and seconds > OTLP_TIMEOUT_PLAUSIBLE_S:
        variable = otel.ENV_METRICS_TIMEOUT if env_value(env, otel.ENV_METRICS_TIMEOUT) else otel.ENV_TIMEOUT
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
    headers = or_none(lambda: otel.otlp_headers(env))
    certificate = or_none(lambda: otel.otlp_certificate(env))
    certificate_set = env_value(env, otel.ENV_METRICS_CERTIFICATE) or env_value(env, otel.ENV_CERTIFICATE)
    client = or_none(lambda: otel.otlp_client_certificate(env, in_force.protocol))
    client_bad = client is None and any(env_value(env, name) for name in CLIENT_TLS_VARIABLES)
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


def check_pull_mode(env: Mapping[str, str], in_force: InForce) -> list[str]:
    """Whether pull mode can listen where it is told to: by listening there, as a run would, and stopping."""
    address = or_none(lambda: otel.prometheus_address(env))
    if "prometheus" not in in_force.exporters or address is None:
        return []
    if importlib.util.find_spec("opentelemetry.exporter.prometheus") is None:
        return []  # reported with the other problems of the environment
    try:
        reader = prometheus_reader(env)
    except ConfigurationError as error:
        return [str(error)]
    reader.shutdown()
    print(f"pull mode: can listen on {address[0]} port {address[1]}")
    return []


def volume_estimate(settings: SeedLayerSettings, seeds: int, layers: int, in_force: InForce) -> str:
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
    interval_ms = or_none(lambda: otel.export_interval_ms(os.environ))
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
