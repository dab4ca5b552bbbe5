"""The OpenTelemetry versions: what pyproject.toml declares, what CI installs, and the private parts used.

The package uses private parts of the SDK and of the Prometheus exporter (docs/otel-internals.md), so
the declared range must be the tested one: from the oldest version the package supports to the
versions CI pins (constraints.txt), and below the next minor release. The tests that exercise those
parts (test_cardinality.py, test_diagnostics.py, test_pull_mode.py, test_provider.py, ...) run in this
suite on the pinned versions; ``test_pins_are_the_oldest_declared_versions`` keeps the pins equal to
the declared minimum, so that run is on the oldest supported versions too.
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


def _pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        requirement = line.split("#", 1)[0].strip()
        if requirement:
            name, _, pinned = requirement.partition("==")
            pins[canonicalize_name(name)] = pinned
    return pins


def _bounds(specifier: SpecifierSet) -> tuple[Version | None, Version | None]:
    lower = [Version(s.version) for s in specifier if s.operator == ">="]
    upper = [Version(s.version) for s in specifier if s.operator == "<"]
    return (lower[0] if lower else None), (upper[0] if upper else None)


def test_every_opentelemetry_dependency_has_a_tested_range_and_ci_installs_the_pins() -> None:
    pins = _pins()
    requirements = _requirements()
    assert {canonicalize_name(r.name) for r in requirements} == {
        "opentelemetry-api",
        "opentelemetry-sdk",
        "opentelemetry-exporter-otlp-proto-http",
        "opentelemetry-exporter-otlp-proto-grpc",
        "opentelemetry-exporter-prometheus",
    }
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        lower, upper = _bounds(requirement.specifier)
        assert lower is not None and upper is not None, f"{requirement}: needs a lower and an upper bound"
        assert upper == Version(f"{lower.major}.{lower.minor + 1}"), (
            f"{requirement}: the upper bound is not the next minor release after the tested one"
        )
        assert name in pins, f"{name} is not pinned in constraints.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), f"pin {pins[name]} outside {requirement}"
        assert version(name) == pins[name], f"{name} {version(name)} installed, constraints.txt pins {pins[name]}"


def test_pins_are_the_oldest_declared_versions() -> None:
    """The suite's run on the pins is the run on the oldest supported versions: move both together, or
    add a run of the internals' tests on the oldest versions before raising a pin above the minimum."""
    pins = _pins()
    for requirement in _requirements():
        lower, _ = _bounds(requirement.specifier)
        assert Version(pins[canonicalize_name(requirement.name)]) == lower, requirement


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
