"""Static checks of the Collector config, Nissa's Prometheus config and docker-compose.yml.

The Collector binary cannot run here (docs/operations.md gives `otelcol-contrib validate`); these checks are
what can honestly be checked without it: every component a pipeline names is defined, the ports agree across
the Collector config, the Prometheus config, docker-compose.yml and the docs, the files compose mounts exist,
and the names the rules expect are the names the exporters produce.
"""

from __future__ import annotations

import re
import subprocess

import yaml

from devtools.stack import REPO_ROOT, backend_binaries
from tolaria_otel import LAYER_NONFINITE, LAYER_NORM, SEED_NORM, SERIES_BUDGET, SETTINGS_INFO

COLLECTOR = yaml.safe_load((REPO_ROOT / "collector" / "otel-collector.yaml").read_text())
DEBUG_OVERLAY = yaml.safe_load((REPO_ROOT / "collector" / "otel-collector.debug.yaml").read_text())
PROMETHEUS = yaml.safe_load((REPO_ROOT / "collector" / "prometheus.yml").read_text())
COMPOSE = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
RULES_TEXT = (REPO_ROOT / "collector" / "rules" / "tolaria-seed-layers.rules.yml").read_text()
OPERATIONS = (REPO_ROOT / "docs" / "operations.md").read_text()
COLLECTOR_IMAGE = "otel/opentelemetry-collector-contrib:0.120.0"


def component_type(name: str) -> str:
    return name.split("/", 1)[0]  # "batch/fast" is a "batch"


def default_address(value: str) -> str:
    """`${env:VAR:-127.0.0.1:4317}` -> `127.0.0.1:4317`."""
    match = re.fullmatch(r"\$\{env:(\w+):-(.+)\}", value)
    assert match, f"{value!r}: expected ${{env:VAR:-default}}, so an environment variable can change it"
    return match.group(2)


def endpoints() -> dict[str, str]:
    protocols = COLLECTOR["receivers"]["otlp"]["protocols"]
    return {
        "grpc": default_address(protocols["grpc"]["endpoint"]),
        "http": default_address(protocols["http"]["endpoint"]),
        "prometheus": default_address(COLLECTOR["exporters"]["prometheus"]["endpoint"]),
    }


def test_every_component_a_pipeline_names_is_defined() -> None:
    pipelines = COLLECTOR["service"]["pipelines"]
    assert list(pipelines) == ["metrics"]
    for section in ("receivers", "processors", "exporters"):
        for pipeline in [*pipelines.values(), *DEBUG_OVERLAY["service"]["pipelines"].values()]:
            for name in pipeline.get(section, []):
                assert name in COLLECTOR[section], f"{section[:-1]} {name!r} is used but not defined"


def test_pipeline_shape() -> None:
    metrics = COLLECTOR["service"]["pipelines"]["metrics"]
    assert metrics["receivers"] == ["otlp"]
    assert metrics["processors"][0] == "memory_limiter", "memory_limiter must come first"
    assert [component_type(p) for p in metrics["processors"]] == ["memory_limiter", "batch"]
    assert metrics["exporters"] == ["prometheus"], "debug stays off unless the overlay asks for it"
    assert DEBUG_OVERLAY["service"]["pipelines"]["metrics"]["exporters"] == ["prometheus", "debug"]


def test_listens_on_loopback_by_default() -> None:
    assert endpoints() == {"grpc": "127.0.0.1:4317", "http": "127.0.0.1:4318", "prometheus": "127.0.0.1:8889"}


def test_prometheus_exporter_choices() -> None:
    exporter = COLLECTOR["exporters"]["prometheus"]
    # Names independent of the units: the same as pull mode and the rules by configuration (the collector's
    # comment says why it stays although today's units would give the same names).
    assert exporter["add_metric_suffixes"] is False
    assert exporter["resource_to_telemetry_conversion"] == {"enabled": True}
    assert exporter["send_timestamps"] is True  # the current-top-K query relies on the points' own timestamps
    assert exporter["metric_expiration"] == "2m"
    assert "metric_expiration: 2m" in OPERATIONS


def test_prometheus_scrapes_the_collector_and_the_trainer_where_they_listen() -> None:
    jobs = {job["job_name"]: job for job in PROMETHEUS["scrape_configs"]}
    assert jobs["otel-collector"]["static_configs"] == [{"targets": [endpoints()["prometheus"]]}]
    assert jobs["otel-collector"]["honor_labels"] is True
    # The pull-mode alternative: the package's default OTEL_EXPORTER_PROMETHEUS_PORT.
    assert jobs["tolaria-trainer"]["static_configs"] == [{"targets": ["127.0.0.1:9464"]}]
    assert PROMETHEUS["rule_files"] == ["rules/*.rules.yml"]
    result = subprocess.run([backend_binaries().promtool, "check", "config", REPO_ROOT / "collector" / "prometheus.yml"],
                            check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_docs_give_the_same_ports_and_the_validate_command() -> None:
    for address in endpoints().values():
        assert address in OPERATIONS, f"{address} not in docs/operations.md"
    assert "otelcol-contrib validate --config collector/otel-collector.yaml" in OPERATIONS
    assert "0.120.0" in (REPO_ROOT / "collector" / "otel-collector.yaml").read_text().split("receivers:")[0]


def test_compose_pins_versions_and_publishes_the_collector_ports() -> None:
    services = COMPOSE["services"]
    images = {name: service["image"] for name, service in services.items()}
    assert images == {"otel-collector": COLLECTOR_IMAGE, "prometheus": "prom/prometheus:v2.53.3",
                      "grafana": "grafana/grafana:11.5.2"}
    for image in images.values():
        assert not image.endswith(":latest") and ":" in image
    collector = services["otel-collector"]
    # Inside the container the receivers listen beyond loopback, on the same ports as the defaults.
    env = collector["environment"]
    assert env["OTELCOL_OTLP_GRPC_ENDPOINT"].endswith(":" + endpoints()["grpc"].rsplit(":", 1)[1])
    assert env["OTELCOL_OTLP_HTTP_ENDPOINT"].endswith(":" + endpoints()["http"].rsplit(":", 1)[1])
    for variable in env:
        assert f"${{env:{variable}:-" in (REPO_ROOT / "collector" / "otel-collector.yaml").read_text()
    published = {port.split(":")[-1] for port in collector["ports"]}
    assert published == {"4317", "4318", "9090"}
    assert all(port.startswith("127.0.0.1:") for port in collector["ports"])
    # Prometheus in the Collector's namespace: 127.0.0.1:8889 in prometheus.yml reaches the Collector.
    assert services["prometheus"]["network_mode"] == "service:otel-collector"
    assert "prometheus" in collector["networks"]["default"]["aliases"]  # Grafana's data source host


def test_compose_mounts_exist_and_match_the_configs() -> None:
    for name, service in COMPOSE["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (REPO_ROOT / source).exists(), f"{name} mounts {source}, which does not exist"
    mounts = {v.split(":")[1]: v.split(":")[0] for v in COMPOSE["services"]["prometheus"]["volumes"]}
    assert mounts["/etc/prometheus/prometheus.yml"] == "./collector/prometheus.yml"
    assert mounts["/etc/prometheus/rules"] == "./collector/rules"  # rule_files: rules/*.rules.yml
    grafana = {v.split(":")[1]: v.split(":")[0] for v in COMPOSE["services"]["grafana"]["volumes"]}
    assert grafana["/etc/grafana/provisioning/datasources"] == "./dashboards/provisioning/datasources"
    assert grafana["/etc/grafana/provisioning/dashboards"] == "./dashboards/provisioning/dashboards"
    dashboards_path = grafana_dashboards_path()
    assert grafana[dashboards_path] == "./dashboards/json"
    assert list((REPO_ROOT / "dashboards" / "json").glob("*.json")), "no dashboard JSON to provision"
    collector = {v.split(":")[1]: v.split(":")[0] for v in COMPOSE["services"]["otel-collector"]["volumes"]}
    config_path = next(arg.split("=", 1)[1] for arg in COMPOSE["services"]["otel-collector"]["command"]
                       if arg.startswith("--config="))
    assert collector[config_path] == "./collector/otel-collector.yaml"


def grafana_dashboards_path() -> str:
    """Where the dashboards provisioning file tells Grafana to look for JSON (must be the compose mount)."""
    provisioning = REPO_ROOT / "dashboards" / "provisioning" / "dashboards"
    (provider,) = [p for f in sorted(provisioning.glob("*.y*ml")) for p in yaml.safe_load(f.read_text())["providers"]]
    return str(provider["options"]["path"])


def test_rules_use_the_names_the_exporters_produce() -> None:
    # OTel name -> Prometheus name, as the Collector, pull mode and VictoriaMetrics write them (no unit suffix:
    # the unit-less gauges get none, and "grad" is already a name token); tests/test_pipeline.py checks pull mode
    # and VictoriaMetrics produce these against real servers.
    def prometheus_name(otel_name: str) -> str:
        return otel_name.replace(".", "_")

    names = {prometheus_name(n) for n in (LAYER_NORM, LAYER_NONFINITE, SEED_NORM, SETTINGS_INFO, SERIES_BUDGET)}
    assert names == {"tolaria_grad_agg_seed_layer_norm", "tolaria_grad_agg_seed_layer_nonfinite",
                     "tolaria_grad_agg_seed_norm", "tolaria_grad_agg_seed_layer_info",
                     "tolaria_grad_agg_seed_layer_series_budget"}
    used = set(re.findall(r"tolaria_grad_agg_[a-z_]+", RULES_TEXT))
    assert used == names, used ^ names  # every name plainly, and no suffixed spelling
    assert "__name__" not in RULES_TEXT  # no name-regex workarounds either
