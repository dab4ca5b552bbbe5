"""The Collector configs, Nissa's Prometheus config and docker-compose.yml.

Every config in collector/ whose components the core Collector built by `make backends` has is validated by
it (tests/test_collector_pipeline.py runs them live); the contrib-only ones (the prometheus exporter,
resourcedetection) are named in CONTRIB_ONLY and checked statically: every component a pipeline names is
defined, the ports agree across the Collector config, the Prometheus config, docker-compose.yml and the docs,
the files compose mounts exist, and the names the rules expect are the names the exporters produce.
"""

from __future__ import annotations

import re
import subprocess

import pytest
import yaml

from devtools.stack import REPO_ROOT, Collector, backend_binaries, collector_binary
from tolaria_otel import LAYER_NONFINITE, LAYER_NORM, SEED_NORM, SEED_NOT_MEASURED, SERIES_BUDGET, SETTINGS_INFO
from tolaria_otel.export.instruments import (
    CLIPPED_STEPS,
    MIN_CLIP_FACTOR,
    SEED_CLIPPED_STEPS,
    SEED_MIN_CLIP_FACTOR,
    SEED_NORM_MAX,
    SEED_STEP_NORM,
)

pytestmark = pytest.mark.backend

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
    result = subprocess.run(
        [backend_binaries().promtool, "check", "config", REPO_ROOT / "collector" / "prometheus.yml"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_docs_give_the_same_ports_and_the_validate_command() -> None:
    for address in endpoints().values():
        assert address in OPERATIONS, f"{address} not in docs/operations.md"
    assert "otelcol-contrib validate --config collector/otel-collector.yaml" in OPERATIONS
    assert "0.120.0" in (REPO_ROOT / "collector" / "otel-collector.yaml").read_text().split("receivers:")[0]


def test_compose_pins_versions_and_publishes_the_collector_ports() -> None:
    services = COMPOSE["services"]
    images = {name: service["image"] for name, service in services.items()}
    assert images == {
        "otel-collector": COLLECTOR_IMAGE,
        "prometheus": "prom/prometheus:v2.53.3",
        "grafana": "grafana/grafana:11.5.2",
    }
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
    config_path = next(
        arg.split("=", 1)[1] for arg in COMPOSE["services"]["otel-collector"]["command"] if arg.startswith("--config=")
    )
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

    names = {
        prometheus_name(n)
        for n in (
            LAYER_NORM,
            LAYER_NONFINITE,
            SEED_NORM,
            SEED_NORM_MAX,
            SEED_NOT_MEASURED,
            SETTINGS_INFO,
            SERIES_BUDGET,
            CLIPPED_STEPS,
            MIN_CLIP_FACTOR,
            SEED_CLIPPED_STEPS,
            SEED_MIN_CLIP_FACTOR,
        )
    }
    names |= {prometheus_name(SEED_STEP_NORM) + suffix for suffix in ("_bucket", "_count")}  # every histogram's
    assert names == {
        "tolaria_grad_agg_seed_layer_norm",
        "tolaria_grad_agg_seed_layer_nonfinite",
        "tolaria_grad_agg_seed_norm",
        "tolaria_grad_agg_seed_norm_max",
        "tolaria_grad_agg_seed_layer_info",
        "tolaria_grad_agg_seed_layer_series_budget",
        "tolaria_grad_agg_seed_not_measured",
        "tolaria_grad_agg_seed_step_norm_bucket",
        "tolaria_grad_agg_seed_step_norm_count",
        "tolaria_grad_agg_clip_clipped_steps",
        "tolaria_grad_agg_clip_min_factor",
        "tolaria_grad_agg_seed_clip_clipped_steps",
        "tolaria_grad_agg_seed_clip_min_factor",
    }
    used = set(re.findall(r"tolaria_grad_agg_[a-z_]+", RULES_TEXT))
    assert used == names, used ^ names  # every name plainly, and no suffixed spelling
    assert "__name__" not in RULES_TEXT  # no name-regex workarounds either


# ------------------------------------------------------------------------------- the real Collector (make backends)
#: The configs that need otelcol-contrib (components the core Collector built here lacks), each with the
#: contrib component that keeps it out: they are checked statically above.
CONTRIB_ONLY = {
    "otel-collector.yaml": "prometheus exporter",
    "otel-collector.debug.yaml": "an overlay of otel-collector.yaml",
    "agent-gateway/gateway.yaml": "prometheus exporter",
    "agent-gateway/agent.resourcedetection.yaml": "resourcedetection processor",
}
#: What each config the core Collector covers needs from its environment to validate (required addresses).
#: TLS file paths are not read by `validate`; tests/test_tls.py runs these configs with real certificates.
GATEWAY_TLS_ENV = {
    "OTELCOL_TLS_CERT_FILE": "/etc/otelcol/gateway.pem",
    "OTELCOL_TLS_KEY_FILE": "/etc/otelcol/gateway-key.pem",
    "OTELCOL_TLS_CLIENT_CA_FILE": "/etc/otelcol/ca.pem",
}
REQUIRED_ENV = {
    "agent-gateway/agent.yaml": {
        "OTELCOL_GATEWAY_ENDPOINT": "127.0.0.1:4317",
        "OTELCOL_TLS_CA_FILE": "/etc/otelcol/ca.pem",
        "OTELCOL_TLS_CERT_FILE": "/etc/otelcol/agent.pem",
        "OTELCOL_TLS_KEY_FILE": "/etc/otelcol/agent-key.pem",
    },
    "agent-gateway/gateway-store.yaml": {
        "OTELCOL_STORE_OTLP_ENDPOINT": "http://127.0.0.1:8428/opentelemetry/v1/metrics",
        **GATEWAY_TLS_ENV,
    },
}
COLLECTOR_CONFIGS = sorted(
    str(path.relative_to(REPO_ROOT / "collector"))
    for path in (REPO_ROOT / "collector").rglob("*.yaml")
    if "rules" not in path.parts
)


def built_collector_components() -> dict[str, set[str]]:
    """What `otelcol components` of the Collector `make backends` built lists, by kind."""
    listing = yaml.safe_load(
        subprocess.run(
            [collector_binary(), "components"], check=True, capture_output=True, text=True, timeout=60
        ).stdout
    )
    return {kind: {item["name"] for item in listing[kind] or []} for kind in ("receivers", "processors", "exporters")}


def test_every_collector_config_is_run_by_the_built_collector_or_named_contrib_only() -> None:
    assert set(CONTRIB_ONLY) | set(REQUIRED_ENV) <= set(COLLECTOR_CONFIGS)
    covered = [name for name in COLLECTOR_CONFIGS if name not in CONTRIB_ONLY]
    assert covered == ["agent-gateway/agent.yaml", "agent-gateway/gateway-store.yaml", "otel-collector-store.yaml"]


@pytest.mark.parametrize("name", [n for n in COLLECTOR_CONFIGS if n not in CONTRIB_ONLY])
def test_the_built_collector_validates(name: str, tmp_path) -> None:
    config = yaml.safe_load((REPO_ROOT / "collector" / name).read_text())
    components = built_collector_components()
    for kind, available in components.items():
        # The config's own names, as every Collector version spells them (0.152 also takes the older aliases).
        aliases = {"otlp_grpc": "otlp", "otlp_http": "otlphttp"}
        known = available | {aliases.get(n, n) for n in available}
        assert {component_type(c) for c in config.get(kind, {})} <= known, f"{name}: {kind} the build lacks"
    collector = Collector(collector_binary(), tmp_path, [REPO_ROOT / "collector" / name], REQUIRED_ENV.get(name))
    result = collector.validate()
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_built_collector_names_what_is_missing() -> None:
    result = Collector(
        collector_binary(),
        REPO_ROOT / ".cache" / "otelcol",
        [REPO_ROOT / "collector" / "agent-gateway" / "gateway-store.yaml"],
    ).validate()
    assert result.returncode != 0
    assert "otlphttp" in result.stderr and "endpoint" in result.stderr  # OTELCOL_STORE_OTLP_ENDPOINT unset


def test_store_and_contrib_configs_share_receivers_and_processors() -> None:
    """The store path and the contrib path (single node and gateway) take in and process data the same way."""
    pairs = [
        ("otel-collector.yaml", "otel-collector-store.yaml"),
        ("agent-gateway/gateway.yaml", "agent-gateway/gateway-store.yaml"),
    ]
    for contrib, store in pairs:
        one, other = (yaml.safe_load((REPO_ROOT / "collector" / n).read_text()) for n in (contrib, store))
        for key in ("receivers", "processors"):
            assert one[key] == other[key], f"{contrib} and {store} differ in {key}"
        one_pipeline, other_pipeline = (c["service"]["pipelines"]["metrics"] for c in (one, other))
        assert one_pipeline["receivers"] == other_pipeline["receivers"]
        assert one_pipeline["processors"] == other_pipeline["processors"]


# ------------------------------------------------------------------------------- listeners and TLS
LOOPBACK = ("127.0.0.1:", "localhost:", "[::1]:")


def listeners(name: str) -> dict[str, dict]:
    """Every server a config starts, by what it is, with its settings (``endpoint``, ``tls``)."""
    config = yaml.safe_load((REPO_ROOT / "collector" / name).read_text())
    found = {
        f"otlp {protocol}": settings
        for protocol, settings in config.get("receivers", {}).get("otlp", {}).get("protocols", {}).items()
    }
    if "prometheus" in config.get("exporters", {}):
        found["prometheus exporter"] = config["exporters"]["prometheus"]
    return found


def required_env(value: object) -> str:
    """`${env:VAR}` (no default: the Collector refuses to start without it) -> VAR."""
    match = re.fullmatch(r"\$\{env:(\w+)\}", str(value))
    assert match, f"{value!r}: expected ${{env:VAR}} without a default"
    return match.group(1)


@pytest.mark.parametrize("name", [n for n in COLLECTOR_CONFIGS if listeners(n)])
def test_a_listener_beyond_loopback_takes_mutual_tls_only(name: str) -> None:
    for what, settings in listeners(name).items():
        address = default_address(settings["endpoint"])
        if address.startswith(LOOPBACK):
            continue
        tls = settings.get("tls") or {}
        assert {key: required_env(tls.get(key)) for key in ("cert_file", "key_file", "client_ca_file")} == {
            "cert_file": "OTELCOL_TLS_CERT_FILE",
            "key_file": "OTELCOL_TLS_KEY_FILE",
            "client_ca_file": "OTELCOL_TLS_CLIENT_CA_FILE",
        }, f"{name}: {what} on {address} without mutual TLS"


def test_the_agent_exports_to_the_gateway_with_its_certificate() -> None:
    agent = yaml.safe_load((REPO_ROOT / "collector" / "agent-gateway" / "agent.yaml").read_text())
    tls = agent["exporters"]["otlp"]["tls"]
    assert "insecure" not in tls
    assert {key: required_env(value) for key, value in tls.items()} == {
        "ca_file": "OTELCOL_TLS_CA_FILE",
        "cert_file": "OTELCOL_TLS_CERT_FILE",
        "key_file": "OTELCOL_TLS_KEY_FILE",
    }


def test_the_gateway_does_not_start_without_its_certificates() -> None:
    result = Collector(
        collector_binary(),
        REPO_ROOT / ".cache" / "otelcol",
        [REPO_ROOT / "collector" / "agent-gateway" / "gateway-store.yaml"],
        {"OTELCOL_STORE_OTLP_ENDPOINT": "http://127.0.0.1:8428/opentelemetry/v1/metrics"},
    ).validate()
    assert result.returncode != 0 and "certificate and key" in result.stderr, result.stderr


def test_the_ports_table_has_every_listener_with_its_default_address() -> None:
    table = OPERATIONS.split("## Ports and bind addresses", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    for name in COLLECTOR_CONFIGS:
        for what, settings in listeners(name).items():
            address = default_address(settings["endpoint"])
            file_name = name.rsplit("/", 1)[-1].removesuffix(".yaml")
            assert any(
                address in row and (file_name in row or ("Collector" in row and "/" not in name)) for row in rows
            ), f"{name}: {what} {address} not in docs/operations.md's ports table"
            if not address.startswith(LOOPBACK):
                assert any(address in row and "mutual TLS" in row for row in rows), f"{address}: TLS not said"
    for address in ("localhost:9464", "127.0.0.1:8888", "127.0.0.1:8428", "127.0.0.1:9090", "127.0.0.1:3000"):
        assert any(address in row for row in rows), address  # pull mode, telemetry, the store, compose
    for variable in (
        "OTELCOL_TLS_CERT_FILE",
        "OTELCOL_TLS_KEY_FILE",
        "OTELCOL_TLS_CLIENT_CA_FILE",
        "OTELCOL_TLS_CA_FILE",
        "OTEL_EXPORTER_OTLP_CERTIFICATE",
        "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
        "OTEL_EXPORTER_OTLP_CLIENT_KEY",
    ):
        assert variable in OPERATIONS.split("## TLS", 1)[1], f"{variable} not documented in docs/operations.md, TLS"
