"""The OpenTelemetry versions: what pyproject.toml declares, what CI installs, and the private parts used.

The package uses private parts of the SDK and of the Prometheus exporter (docs/otel-internals.md), so
the declared range must be the tested one: from the oldest version, which constraints-otel-oldest.txt
pins, to the newest, which constraints.txt pins, and below the next minor release after it. ``make test``
runs the whole suite on the newest and the tests that exercise those parts (``OLDEST_TESTS`` in the
Makefile, this module among them) on the oldest, in .venv-otel-oldest. This module checks whichever
venv it runs in.
"""

from __future__ import annotations

import re
from importlib.metadata import version
from pathlib import Path

import tomllib  # type: ignore[import-not-found]  # 3.11+; mypy checks at 3.10, the test extra needs 3.11
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from tolaria_otel.export import sdk_state

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src" / "tolaria_otel"
TABLE = ROOT / "docs" / "otel-internals.md"
#: Private names of other libraries the package uses (not OpenTelemetry's, so not in the table; torch's are
#: listed in docs/torch-internals.md and checked by tests/test_torch_internals.py).
NOT_OPENTELEMETRY = {
    "_foreach_norm": "torch's fused norm, the step path's one op",
    "_foreach_mul_": "torch's fused scale, the clip's (clipping.py, as torch's clip_grad_norm_ does)",
    "_foreach_utils": "torch's grouping of tensors by device and dtype (clipping.py, as torch's clip does)",
    "_dynamo": "torch.compile's tracer (optimizer_hooks.py)",
    "_tensor": "torch.distributed._tensor (DTensor on older torch)",
    "_parameters": "torch.nn.Module's direct parameters (epoch.py)",
    "_modules": "torch.nn.Module's children (epoch.py)",
    "_version": "a tensor's version counter, or the package's own _version module",
    "_replace": "a named tuple's public method (urllib's SplitResult)",
    "_Environ": "the type of os.environ",
    "_optimizer": "the inner optimizer of Lightning's LightningOptimizer (optimizer_hooks.py)",
}


def _requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    raw = [*project["dependencies"], *[r for extra in project["optional-dependencies"].values() for r in extra]]
    return [Requirement(r) for r in raw if Requirement(r).name.startswith("opentelemetry")]


def _pins(file: str = "constraints.txt") -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (ROOT / file).read_text().splitlines():
        requirement = line.split("#", 1)[0].strip()
        if requirement:
            name, _, pinned = requirement.partition("==")
            pins[canonicalize_name(name)] = pinned
    return pins


OLDEST = "constraints-otel-oldest.txt"
#: Pins of the oldest venv that differ from constraints.txt's, and why.
OLDEST_DIFFER = {"protobuf": "opentelemetry-proto 1.35.0 needs protobuf<7"}


def _bounds(specifier: SpecifierSet) -> tuple[Version | None, Version | None]:
    lower = [Version(s.version) for s in specifier if s.operator == ">="]
    upper = [Version(s.version) for s in specifier if s.operator == "<"]
    return (lower[0] if lower else None), (upper[0] if upper else None)


def test_every_opentelemetry_dependency_has_a_tested_range_and_ci_installs_the_pins() -> None:
    """Floor: the oldest venv's pin; upper bound: the minor after the newest pin. The versions installed
    here are one venv's pins, all of them: the newest (.venv) or the oldest (.venv-otel-oldest)."""
    newest, oldest = _pins(), _pins(OLDEST)
    requirements = _requirements()
    assert {canonicalize_name(r.name) for r in requirements} == {
        "opentelemetry-api",
        "opentelemetry-sdk",
        "opentelemetry-exporter-otlp-proto-http",
        "opentelemetry-exporter-otlp-proto-grpc",
        "opentelemetry-exporter-prometheus",
    }
    installed = {}
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        lower, upper = _bounds(requirement.specifier)
        assert lower is not None and upper is not None, f"{requirement}: needs a lower and an upper bound"
        assert name in newest and name in oldest, f"{name} is not pinned in constraints.txt and {OLDEST}"
        assert Version(oldest[name]) == lower, f"{requirement}: the floor is not {OLDEST}'s {oldest[name]}"
        assert requirement.specifier.contains(newest[name], prereleases=True), f"{newest[name]} outside {requirement}"
        pinned = Version(newest[name])
        assert upper == Version(f"{pinned.major}.{pinned.minor + 1}"), (
            f"{requirement}: the upper bound is not the next minor release after the newest tested, {pinned}"
        )
        installed[name] = version(name)
    assert installed in ({n: newest[n] for n in installed}, {n: oldest[n] for n in installed}), (
        f"installed {installed}: neither constraints.txt's pins nor {OLDEST}'s"
    )


def test_the_oldest_venv_shares_every_other_pin() -> None:
    """The oldest venv differs from .venv in OpenTelemetry and in what its floor needs older only: a pin
    moved in constraints.txt moves there too."""
    newest, oldest = _pins(), _pins(OLDEST)
    differ = {
        name: (oldest[name], newest[name])
        for name in oldest
        if name in newest and oldest[name] != newest[name] and not name.startswith("opentelemetry")
    }
    assert set(differ) == set(OLDEST_DIFFER), differ


def test_the_sdk_internals_the_package_reaches_are_this_sdks() -> None:
    """Where the SDK's internals are not the known ones, sdk_state falls back quietly (the attribute sets
    are kept; a histogram records value by value), which the exported points would not show: on this SDK
    each private part it reads is there, in every reader."""
    from opentelemetry.metrics import Observation
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader

    readers = [InMemoryMetricReader(), InMemoryMetricReader()]
    meter = MeterProvider(metric_readers=readers).get_meter("t")
    gauge = meter.create_observable_gauge(
        "g", callbacks=[lambda options: [Observation(1.0, {"seed_id": seed}) for seed in "abc"]]
    )
    for reader in readers:
        reader.get_metrics_data()
    assert sdk_state.release_idle_attribute_sets([gauge], lambda attributes: attributes["seed_id"] == "a")
    storages = gauge._measurement_consumer._reader_storages.values()  # type: ignore[attr-defined]
    held = [
        [aggregation._attributes for aggregation in match._attributes_aggregation.values()]
        for storage in storages
        for match in storage._instrument_view_instrument_matches[gauge]
    ]
    assert held == [[{"seed_id": "a"}]] * 2

    histogram = meter.create_histogram("h", explicit_bucket_boundaries_advisory=[1.0, 10.0])
    histogram.record(5.0, {"seed_id": "a"})
    index = sdk_state._index(histogram)
    assert index is not None
    aggregations = sdk_state._lookup(index, {"seed_id": "a"})
    assert aggregations is not None and len(aggregations) == 2
    assert sdk_state._add_to_buckets(aggregations, [(0.5, 3), (20.0, 1)])
    for reader in readers:
        data = reader.get_metrics_data()
        assert data is not None
        (metric,) = [m for m in data.resource_metrics[0].scope_metrics[0].metrics if m.name == "h"]
        (point,) = metric.data.data_points
        assert isinstance(point, HistogramDataPoint)
        assert (point.count, point.sum, list(point.bucket_counts), point.min, point.max) == (
            5,
            26.5,
            [3, 1, 1],
            0.5,
            20,
        )


def _listed() -> dict[str, set[str]]:
    """The table's private names per module."""
    listed: dict[str, set[str]] = {}
    for line in TABLE.read_text().splitlines():
        match = re.match(r"\| `([\w/]+\.py)` \| (.*?) \|", line)
        if match:
            listed.setdefault(match.group(1), set()).update(re.findall(r"`(_\w+)`", match.group(2)))
    return listed


def _private_names_used(text: str, package_functions: set[str]) -> set[str]:
    """Private names a module takes from elsewhere: attributes, getattr strings and imports that neither
    the package defines (a function or class) nor the module (a module-level name, an attribute it assigns).
    A name the package defines for itself too (``_value``) is not found: the table lists it all the same."""
    text = re.sub(r"#.*", "", re.sub(r'"""[\s\S]*?"""', "", text))  # code only: no docstring, no comment
    used = set(re.findall(r"\.(_[A-Za-z]\w*)", text)) | set(re.findall(r"getattr\(\s*\w+,\s*\"(_\w+)\"", text))
    for imported in re.findall(r"^from [\w.]+ import (.+)$", text, re.M):
        used |= set(re.findall(r"\b(_[A-Za-z]\w*)", imported))
    defined = (
        package_functions
        | set(re.findall(r"^(_\w+)\b", text, re.M))
        | set(re.findall(r"self\.(_\w+)(?:\s*:[^=\n]*)?\s*=[^=]", text))
        | set(re.findall(r"self\.(_\w+), self", text))
    )
    return {name for name in used - defined if not name.startswith("__")} - set(NOT_OPENTELEMETRY)


def test_every_private_opentelemetry_part_is_listed_and_every_listed_one_is_used() -> None:
    listed = _listed()
    assert set(listed) == {"export/sdk_state.py", "export/prometheus_reader.py", "config/redaction.py"}, listed
    modules = sorted(SOURCE.rglob("*.py"))
    package_functions = {name for module in modules for name in re.findall(r"(?:def|class) (_\w+)", module.read_text())}
    for module in modules:
        text = module.read_text()
        path = module.relative_to(SOURCE).as_posix()
        used = _private_names_used(text, package_functions)
        assert used <= listed.get(path, set()), (
            f"{path} uses private parts that docs/otel-internals.md does not list: {sorted(used - listed.get(path, set()))}"  # noqa: E501
        )
        for name in listed.get(path, ()):
            assert re.search(rf"\b{name}\b", text), (
                f"docs/otel-internals.md lists {name} in {path}, which no longer uses it"
            )


def test_the_private_reader_list_is_not_read() -> None:
    """``MeterProvider._metric_readers`` is gone from the package: it keeps the readers it makes."""
    assert not any("._metric_readers" in module.read_text() for module in SOURCE.rglob("*.py"))
