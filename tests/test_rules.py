"""The alert and recording rules (collector/rules/) with the real promtool and a real Prometheus.

The rules' behaviour is unit-tested in collector/rules/tests/*.test.yml (both label shapes, several trainers
of one process told apart by env_id, every alert's thresholds and `for`); tests/test_pipeline.py fires them on
series from a real training run. Here: promtool runs those unit tests, and the contract the dashboards rely on
(names, severities, `for`) is read back from the rules as a real Prometheus loaded them.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from devtools.stack import REPO_ROOT, _api, backend_binaries, prometheus

pytestmark = pytest.mark.backend

RULES_DIR = REPO_ROOT / "collector" / "rules"
RULE_FILE = RULES_DIR / "tolaria-seed-layers.rules.yml"

#: The contract with the dashboards (dashboards/) and docs/operations.md: name -> (severity, for in seconds).
ALERTS = {
    "TolariaSeedLayerNonFinite": ("critical", 0),
    "TolariaSeedLayerGradientExploding": ("warning", 300),
    "TolariaSeedGradientVanishing": ("warning", 900),
    "TolariaSeedNotMeasured": ("warning", 900),
    "TolariaSeedLayerTelemetryAbsent": ("warning", 1800),
    "TolariaSeedGradientSpike": ("warning", 900),
    "TolariaSeedGradientNoisy": ("warning", 1800),
    "TolariaSeedExplodingUnderClipping": ("warning", 300),
}
RECORDS = [
    "tolaria:seed_layer_norm:current",
    "tolaria:seed_layer_norm:top1",
    "tolaria:seed_layer_norm:series",
    "tolaria:seed_layer_norm:budget",
]


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [backend_binaries().promtool, *map(str, args)], check=False, capture_output=True, text=True, timeout=120
    )


def test_rule_files_are_valid() -> None:
    result = promtool("check", "rules", *sorted(RULES_DIR.glob("*.rules.yml")))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 12 rules found" in result.stdout


def test_promtool_unit_tests_pass() -> None:
    tests = sorted((RULES_DIR / "tests").glob("*.test.yml"))
    assert [t.name for t in tests] == ["alerts.test.yml", "recording.test.yml"]
    result = promtool("test", "rules", *tests)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(tests), result.stdout


def test_every_alert_has_a_unit_test() -> None:
    text = (RULES_DIR / "tests" / "alerts.test.yml").read_text()
    for name in ALERTS:
        assert f"alertname: {name}" in text


def test_unit_tests_cover_several_trainers_and_both_stage_spellings() -> None:
    """The inputs the rules must keep apart: two trainers of one process with the same seed ids (env_id),
    and Kasmina's stage names with and without the SEED_STAGE_ prefix."""
    tests = yaml.safe_load((RULES_DIR / "tests" / "alerts.test.yml").read_text())["tests"]
    fired = [
        alert["exp_labels"]
        for test in tests
        for check in test["alert_rule_test"]
        for alert in check["exp_alerts"]
        if check["alertname"] == "TolariaSeedNotMeasured"
    ]
    assert {(labels["seed_id"], labels.get("env_id")) for labels in fired} >= {("seed-0", "0"), ("seed-0", "1")}
    stages = {labels["stage"] for labels in fired}
    assert any(s.startswith("SEED_STAGE_") for s in stages) and any(not s.startswith("SEED_STAGE_") for s in stages)


def test_contract_as_prometheus_loads_it(tmp_path: Path) -> None:
    with prometheus("global: {}\n", tmp_path / "prom", rule_files=[RULE_FILE]) as prom:
        (group,) = _api(prom.url + "/api/v1/rules")["groups"]
    assert group["name"] == "tolaria-seed-layers"
    alerts = {r["name"]: (r["labels"]["severity"], r["duration"]) for r in group["rules"] if r["type"] == "alerting"}
    assert alerts == ALERTS
    assert [r["name"] for r in group["rules"] if r["type"] == "recording"] == RECORDS
    for rule in group["rules"]:
        if rule["type"] == "alerting":
            assert rule["annotations"]["summary"] and "docs/operations.md#alerts" in rule["annotations"]["description"]
