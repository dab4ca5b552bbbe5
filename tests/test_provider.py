"""configure_meter_provider from the standard OTEL_* variables."""

import logging
import re
import urllib.request

import pytest
import torch
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, PeriodicExportingMetricReader
from prometheus_client.parser import text_string_to_metric_families

from tolaria_otel import ConfigurationError, SeedLayerSettings, SeedLayerTelemetry, configure_meter_provider
from tolaria_otel.config.otel_env import exporter_names, otlp_protocol
from tolaria_otel.export.prometheus_reader import ServingPrometheusReader

from .helpers import provider_readers as _readers

ON = SeedLayerSettings(enabled=True)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("", ["otlp"]), ("otlp", ["otlp"]), (" Console , otlp ", ["console", "otlp"]), ("none", [])],
)
def test_exporter_names(raw, expected):
    assert exporter_names({"OTEL_METRICS_EXPORTER": raw}) == expected


@pytest.mark.parametrize("raw", ["zipkin", "otlp,jaeger", "none,otlp"])
def test_bad_exporter_names_variable_and_choices(raw):
    with pytest.raises(ConfigurationError, match=r"^OTEL_METRICS_EXPORTER=.* is not valid"):
        exporter_names({"OTEL_METRICS_EXPORTER": raw})


def test_protocol_default_specific_and_bad():
    assert otlp_protocol({}) == "http/protobuf"
    assert otlp_protocol({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}) == "grpc"
    assert (
        otlp_protocol({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "http/protobuf"})
        == "http/protobuf"
    )
    with pytest.raises(
        ConfigurationError,
        match=r"^OTEL_EXPORTER_OTLP_PROTOCOL='http/json' is not valid: expected "
        r"one of http/protobuf, grpc$",
    ):
        otlp_protocol({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})


def test_none_builds_no_reader_and_default_service_name(monkeypatch):
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    extra = InMemoryMetricReader()
    provider = configure_meter_provider(ON, readers=[extra])
    assert _readers(provider) == [extra]
    assert provider._sdk_config.resource.attributes["service.name"] == "tolaria"
    provider.shutdown()


def test_service_name_and_resource_attributes_from_env(monkeypatch):
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "console")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "trainer-7")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=lab")
    provider = configure_meter_provider(ON)
    (reader,) = _readers(provider)
    assert isinstance(reader, PeriodicExportingMetricReader)
    attributes = provider._sdk_config.resource.attributes
    assert (attributes["service.name"], attributes["deployment.environment"]) == ("trainer-7", "lab")
    provider.shutdown()


def test_sdk_disabled_gives_noop_meters(monkeypatch):
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "prometheus")  # not started: the SDK is off
    provider = configure_meter_provider(ON)
    assert _readers(provider) == []
    seed = torch.nn.Linear(1, 1)
    telemetry = SeedLayerTelemetry(seed, {"s": (seed, "TRAINING")}, settings=ON, meter_provider=provider)
    telemetry.observe_step()
    assert telemetry.end_epoch() is not None  # Tamiyo still gets the summary
    provider.shutdown()


@pytest.mark.parametrize("port", ["http", "70000", "-1"])
def test_bad_prometheus_port(monkeypatch, port):
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "prometheus")
    monkeypatch.setenv("OTEL_EXPORTER_PROMETHEUS_PORT", port)
    with pytest.raises(ConfigurationError, match=rf"^OTEL_EXPORTER_PROMETHEUS_PORT='{port}' is not valid"):
        configure_meter_provider(ON)


def test_prometheus_pull_mode_serves_the_family_and_stops_on_shutdown(monkeypatch):
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "prometheus")
    monkeypatch.setenv("OTEL_EXPORTER_PROMETHEUS_HOST", "127.0.0.1")
    monkeypatch.setenv("OTEL_EXPORTER_PROMETHEUS_PORT", "0")
    provider = configure_meter_provider(ON)
    (reader,) = _readers(provider)
    assert isinstance(reader, ServingPrometheusReader)
    seed = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    telemetry = SeedLayerTelemetry(seed, {"s-1": (seed, "TRAINING")}, settings=ON, meter_provider=provider)
    seed(torch.ones(1, 2)).sum().backward()
    telemetry.observe_step()
    summary = telemetry.end_epoch()
    url = f"http://127.0.0.1:{reader.port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    samples = {
        (s.labels["seed_id"], s.labels["stage"], s.labels["layer"]): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "tolaria_grad_agg_seed_layer_norm"
    }
    assert samples == pytest.approx({("s-1", "TRAINING", layer): v for layer, v in summary.seeds["s-1"].top_layers})
    provider.shutdown()
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=2)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"settings": {"enabled": True}}, r"^settings is dict: expected a tolaria_otel.SeedLayerSettings, or None"),
        ({"settings": "true"}, r"^settings is str: expected a tolaria_otel.SeedLayerSettings"),
        ({"resource": {"service.name": "x"}}, r"^resource is dict: expected an opentelemetry.sdk.resources.Resource"),
        ({"readers": InMemoryMetricReader()}, r"^readers is InMemoryMetricReader: expected a sequence of"),
        ({"readers": [InMemoryMetricReader(), "console"]}, r"^readers holds a str: expected only"),
    ],
)
def test_wrong_argument_types_name_the_argument(monkeypatch, arguments, message):
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
    with pytest.raises(TypeError, match=message):
        configure_meter_provider(**arguments)


@pytest.mark.parametrize(
    ("variable", "value", "accepted"),
    [
        ("OTEL_SDK_DISABLED", "1", "expected true or false"),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "0", "expected a positive number of seconds"),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "-1", "expected a positive number of seconds"),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "nan", "expected a positive number of seconds"),
        ("OTEL_EXPORTER_OTLP_METRICS_TIMEOUT", "abc", "expected a positive number of seconds"),
        ("OTEL_METRIC_EXPORT_INTERVAL", "inf", "expected a positive number of milliseconds"),
        ("OTEL_METRIC_EXPORT_TIMEOUT", "0", "expected a positive number of milliseconds"),
        ("OTEL_EXPORTER_OTLP_COMPRESSION", "zstd", "expected one of none, gzip, deflate"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://[::1", "it does not parse as a URL"),
        ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "collector:4318", "the scheme is not http or https"),
        ("OTEL_RESOURCE_ATTRIBUTES", "a=b,", "entry 2 of 2 is not key=value"),
    ],
)
def test_values_the_sdk_would_misread_fail_at_start(monkeypatch, variable, value, accepted):
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "otlp")
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError, match=rf"^{variable}=?.* is not valid: .*{re.escape(accepted)}"):
        configure_meter_provider(ON)


def test_a_malformed_header_fails_at_start_without_its_value_or_an_sdk_warning(monkeypatch, caplog):
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "authorization Bearer SECRET123")
    with pytest.raises(ConfigurationError, match=r"^OTEL_EXPORTER_OTLP_HEADERS is not valid: entry 1 of 1") as raised:
        configure_meter_provider(ON)
    assert "SECRET123" not in str(raised.value) and "SECRET123" not in caplog.text


def test_headers_the_sdk_accepts_are_accepted_without_a_warning(monkeypatch, caplog):
    """The check mirrors the exporters' liberal header syntax: what it lets through, the SDK parses quietly."""
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "authorization=Bearer abc%20def, x-team = ml ,api-key=a=b")
    provider = configure_meter_provider(ON)
    provider.shutdown()
    assert "Header format invalid" not in caplog.text


def test_values_not_in_force_are_not_checked(monkeypatch, caplog):
    """Stale variables of an exporter not in use do not stop a run: each is refused where it is in force
    (otlp, prometheus, a periodic reader), and with no exporter none is read and nothing complains."""
    bad = {
        "OTEL_EXPORTER_OTLP_TIMEOUT": "abc",
        "OTEL_METRIC_EXPORT_INTERVAL": "inf",
        "OTEL_EXPORTER_PROMETHEUS_PORT": "http",
    }
    for variable, value in bad.items():
        monkeypatch.setenv(variable, value)
    for exporter, culprit in (
        ("otlp", "OTEL_EXPORTER_OTLP_TIMEOUT"),
        ("prometheus", "OTEL_EXPORTER_PROMETHEUS_PORT"),
        ("console", "OTEL_METRIC_EXPORT_INTERVAL"),
    ):
        monkeypatch.setenv("OTEL_METRICS_EXPORTER", exporter)
        with pytest.raises(ConfigurationError, match=rf"^{culprit}="):
            configure_meter_provider(ON)
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        provider = configure_meter_provider(ON)
        assert _readers(provider) == []  # nothing exports
        provider.shutdown()
    assert not caplog.records, caplog.text


def test_a_100_kB_value_gives_a_short_message(monkeypatch):
    for variable in ("OTEL_METRICS_EXPORTER", "OTEL_EXPORTER_OTLP_TIMEOUT", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        monkeypatch.setenv("OTEL_METRICS_EXPORTER", "otlp")
        monkeypatch.setenv(variable, "x" * 100_000)
        with pytest.raises(ConfigurationError) as raised:
            configure_meter_provider(ON)
        assert len(str(raised.value)) < 300 and "(100000 characters)" in str(raised.value)
        monkeypatch.delenv(variable)
