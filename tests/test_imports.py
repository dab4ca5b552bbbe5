"""Importing the package is cheap: torch.distributed.tensor only under torch.distributed, and the
command line's --help without torch. Checked in fresh interpreters by the modules they loaded (not by
time: `python -m benchmarks.imports` prints the times)."""

from __future__ import annotations

import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def loaded_after(code: str) -> set[str]:
    probe = f"import sys\n{code}\nimport json; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    return set(json.loads(out.stdout.splitlines()[-1]))


def test_bare_import_loads_neither_torch_nor_the_sdk():
    modules = loaded_after("import tolaria_otel")
    assert "torch" not in modules and "opentelemetry.sdk.metrics" not in modules


def test_public_api_does_not_load_torch_distributed_tensor():
    modules = loaded_after(
        "from tolaria_otel import SeedLayerTelemetry, configure_meter_provider, SeedLayerSettings, "
        "EpochSummary, seed_layer_views"
    )
    assert "torch" in modules
    assert not {m for m in modules if m.startswith("torch.distributed.tensor")}


@pytest.mark.parametrize(
    "command", [[], ["demo"], ["doctor"], ["plot"], ["report"]], ids=lambda c: " ".join(c) or "top"
)
def test_help_does_not_load_torch(command):
    code = (
        "import contextlib, io\nfrom tolaria_otel.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    try: main({[*command, '--help']!r})\n    except SystemExit: pass"
    )
    assert "torch" not in loaded_after(code)


def test_every_public_name_imports_as_documented():
    """``from tolaria_otel import *`` binds every public name (each resolved by the lazy lookup), each class and
    function under its own name, and each metric-name constant is a metric of the README's table."""
    import tolaria_otel

    namespace: dict[str, object] = {}
    exec("from tolaria_otel import *", namespace)  # the statement users write, run as written
    del namespace["__builtins__"]
    assert sorted(namespace) == sorted(tolaria_otel.__all__)
    assert set(tolaria_otel.__all__) == {*tolaria_otel._EXPORTS, "__version__"}  # the literal list, complete
    documented = set(re.findall(r"^\| `(tolaria\.grad_agg\.[\w.]+)`", README.read_text(encoding="utf-8"), re.MULTILINE))
    metric_names = {name: value for name, value in namespace.items() if isinstance(value, str) and name.isupper()}
    assert metric_names.pop("ROOT_LAYER") == "(root)"  # the layer name of a seed's own parameters
    for name, value in metric_names.items():
        assert value in documented, (name, value)
    for name, bound in namespace.items():
        if isinstance(bound, type) or inspect.isfunction(bound):
            assert bound.__name__ == name
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        tolaria_otel.nope  # noqa: B018
