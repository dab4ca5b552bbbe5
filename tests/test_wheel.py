"""The package as a user installs it: the wheel, built from the sdist, in fresh virtual environments.

``python -m build`` makes the sdist and, from it, the wheel (so the sdist is checked to build it). The
wheel goes into a fresh venv with the core dependencies only (torch==2.13.0 from constraints.txt, the
CPU wheel on these disks), where the demo (``--quiet``: no rich), ``report``, ``doctor`` and ``assets`` run and the
missing extras are named. Each documented extra then goes into a venv of its own that layers on that
core (a ``.pth`` line makes the core venv's packages visible, so torch is installed once): what the
extra adds is installed there, and nothing else is, so each venv holds the core and that one extra.
There the demo runs with rich (``[demo]``; it crashed on a missing Prometheus exporter), in pull mode
(``[prometheus]``), ``doctor`` takes gRPC (``[grpc]``), ``plot`` draws (``[plot]``) and the callbacks
import (``[lightning]``, ``[transformers]``). ``[all]`` is ``[grpc,prometheus]`` and ``[dashboards]``
and ``[test]`` are the repository's own (``make dashboards``, ``make test``): not installed here.

The oldest Python ``requires-python`` admits (3.10) gets the core without torch (no torch wheel for it
lies on these disks, and the CUDA one from the index is several GB): every module compiles, and the
package, ``--version``, ``doctor`` and ``assets`` run. Installs use ``--no-compile`` (half the time): the
first process that imports a module writes its bytecode.
"""

from __future__ import annotations

import email.message
import email.parser
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import tomllib  # type: ignore[import-not-found]  # 3.11+; mypy checks at 3.10, the test extra needs 3.11

from tolaria_otel.cli.assets import PACKAGE_FOLDER, asset_files
from tolaria_otel.cli.doctor_command import FEATURE_OFF as DOCTOR_OFF  # the feature is off in these venvs

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "constraints.txt"
LAYERED_EXTRAS = ("demo", "prometheus", "grpc", "plot", "lightning", "transformers")
CLI = "import sys; from tolaria_otel.cli import main; sys.exit(main(sys.argv[1:]))"
INSTALL_TIMEOUT_S = 600

pytestmark = [
    pytest.mark.packaging,
    pytest.mark.timeout(1200),
]  # the builds and installs of the module's fixtures count in the first test


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment without the repository's source path and without any telemetry setting; bytecode
    is written, so that only the first process of a venv compiles what it imports (torch: about 10 s)."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("OTEL_", "TOLARIA_"))
        and key not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONDONTWRITEBYTECODE")
    }
    return {**env, **extra}


def _run(
    command: Sequence[str], cwd: Path, env: Mapping[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, cwd=cwd, env=dict(env or _clean_env()), capture_output=True, text=True, timeout=timeout, check=False
    )


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"{result.args} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _venv(path: Path, python: str = sys.executable) -> Path:
    """A fresh venv without pip of its own (this interpreter's pip installs into it: 15 s less per venv)."""
    _ok(_run([python, "-m", "venv", "--without-pip", str(path)], ROOT))
    return path / "bin" / "python"


def _pip_install(python: Path, *requirements: str) -> None:
    _ok(
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "--python",
                str(python),
                "install",
                "--quiet",
                "--no-compile",
                "--constraint",
                str(CONSTRAINTS),
                *requirements,
            ],
            ROOT,
            timeout=INSTALL_TIMEOUT_S,
        )
    )


def _site_packages(python: Path) -> Path:
    return Path(_ok(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], ROOT)).strip())


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(sdist, wheel), the wheel built from the sdist."""
    out = tmp_path_factory.mktemp("dist")
    _ok(_run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)], ROOT, timeout=INSTALL_TIMEOUT_S))
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    return sdist, wheel


@pytest.fixture(scope="module")
def core(dist: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The python of a fresh venv holding the wheel and its core dependencies only."""
    python = _venv(tmp_path_factory.mktemp("venvs") / "core")
    _pip_install(python, str(dist[1]))
    return python


@pytest.fixture(scope="module")
def layered(core: Path, dist: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Per extra, the python of a venv with what that extra adds, on top of the core venv."""
    root = tmp_path_factory.mktemp("extras")
    core_packages = _site_packages(core)

    def make(extra: str) -> tuple[str, Path]:
        python = _venv(root / extra)
        (_site_packages(python) / "_core.pth").write_text(f"{core_packages}\n")
        _pip_install(python, f"{dist[1]}[{extra}]")
        return extra, python

    with ThreadPoolExecutor(max_workers=3) as pool:  # downloads and unpacking overlap
        return dict(pool.map(make, LAYERED_EXTRAS))


def _metadata(wheel: Path) -> tuple[email.message.Message, list[str]]:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (metadata,) = [name for name in names if name.endswith(".dist-info/METADATA")]
        return email.parser.Parser().parsestr(archive.read(metadata).decode()), names


def test_the_wheel_carries_license_metadata_and_assets_and_the_sdist_no_tests(dist: tuple[Path, Path]) -> None:
    sdist, wheel = dist
    metadata, names = _metadata(wheel)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert metadata["License-Expression"] == "Apache-2.0"
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names)
    assert metadata["Requires-Python"] == project["requires-python"] == ">=3.10"
    assert metadata["Author"] == "tolaria-otel developers"
    classifiers = metadata.get_all("Classifier")
    assert classifiers is not None
    assert "Programming Language :: Python :: 3.10" in classifiers and "Typing :: Typed" in classifiers
    # Every asset, and nothing from the repository's tests, benchmarks or tools.
    shipped = {
        name.split(f"tolaria_otel/{PACKAGE_FOLDER}/", 1)[1]
        for name in names
        if name.startswith(f"tolaria_otel/{PACKAGE_FOLDER}/")
    }
    assert shipped == {path.as_posix() for path in asset_files(ROOT)}
    assert not [name for name in names if name.startswith(("tests/", "benchmarks/", "devtools/"))]
    with tarfile.open(sdist) as archive:
        members = [member.name.split("/", 1)[1] for member in archive.getmembers() if "/" in member.name]
    assert not [name for name in members if name.startswith("tests")], "the sdist ships tests it cannot run"
    assert "LICENSE" in members and "collector/rules/tolaria-seed-layers.rules.yml" in members


def test_readme_links_resolve_in_what_assets_writes(core: Path, tmp_path: Path) -> None:
    """The README is the wheel's long description: its relative links point into what ``assets`` writes."""
    target = tmp_path / "nissa"
    assert "wrote" in _ok(_run([str(core.parent / "tolaria-otel"), "assets", str(target)], tmp_path))
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", (ROOT / "README.md").read_text())
    relative = [link for link in links if "://" not in link]
    assert relative, "the README has no relative link: this test checks nothing"
    missing = [link for link in relative if not (target / link).exists()]
    assert not missing, f"README links a wheel user does not get from `tolaria-otel assets`: {missing}"


def test_core_install_runs_the_demo_doctor_and_assets_and_names_each_missing_extra(core: Path, tmp_path: Path) -> None:
    cli = str(core.parent / "tolaria-otel")
    assert re.fullmatch(r"tolaria-otel \S+\n", _ok(_run([cli, "--version"], tmp_path)))
    assert _ok(_run([cli, "doctor"], tmp_path)).rstrip().endswith(DOCTOR_OFF)
    demo = _run([cli, "demo", "--quiet", "--epochs", "1", "--output", "run.jsonl"], tmp_path)
    assert _ok(demo).strip() == "run.jsonl"
    assert (tmp_path / "run.jsonl").read_text().count("\n") == 1
    assert _ok(_run([cli, "report", "run.jsonl"], tmp_path)).strip() == "run.html"  # the core needs no extra

    _ok(_run([cli, "assets", "out"], tmp_path))
    written = {
        path.relative_to(tmp_path / "out").as_posix() for path in (tmp_path / "out").rglob("*") if path.is_file()
    }
    assert written == {path.as_posix() for path in asset_files(ROOT)}
    again = _run([cli, "assets", "out"], tmp_path)
    assert again.returncode == 2 and "pass --force to overwrite" in again.stderr
    _ok(_run([cli, "assets", "out", "--force"], tmp_path))

    missing = {
        "demo": ([cli, "demo", "--epochs", "1"], {}, "pip install 'tolaria-otel[demo]'"),
        "prometheus": ([cli, "doctor"], {"OTEL_METRICS_EXPORTER": "prometheus"}, "tolaria-otel[prometheus]"),
        "grpc": ([cli, "doctor"], {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "tolaria-otel[grpc]"),
        "plot": ([cli, "plot", "run.jsonl"], {}, "pip install 'tolaria-otel[plot]'"),
    }
    for extra, (command, env, named) in missing.items():
        result = _run(command, tmp_path, _clean_env(**env))
        assert result.returncode != 0 and named in result.stderr, (extra, result.stderr)
    for module in ("lightning", "transformers"):
        result = _run([str(core), "-c", f"import tolaria_otel.{module}"], tmp_path)
        assert result.returncode == 1 and f"No module named '{module}'" in result.stderr


def _layer_runs(layered: dict[str, Path], extra: str, tmp_path: Path, *args: str, **env: str) -> str:
    return _ok(_run([str(layered[extra]), "-c", CLI, *args], tmp_path, _clean_env(**env)))


def test_demo_extra_runs_the_demo_as_the_readme_says(layered: dict[str, Path], tmp_path: Path) -> None:
    out = _layer_runs(layered, "demo", tmp_path, "demo", "--epochs", "2")
    assert "wrote 2 epochs to runs/demo.jsonl" in out
    assert (tmp_path / "runs" / "demo.jsonl").read_text().count("\n") == 2


def test_prometheus_extra_serves_pull_mode(layered: dict[str, Path], tmp_path: Path) -> None:
    pull = {
        "OTEL_METRICS_EXPORTER": "prometheus",
        "OTEL_EXPORTER_PROMETHEUS_HOST": "127.0.0.1",
        "OTEL_EXPORTER_PROMETHEUS_PORT": "0",
    }
    out = _layer_runs(layered, "prometheus", tmp_path, "doctor", **pull)
    assert "pull mode: can listen on 127.0.0.1 port 0" in out and out.rstrip().endswith(DOCTOR_OFF)
    # The demo prints the URL it serves, which needs rich: this venv has only [prometheus], so --quiet.
    assert (
        _layer_runs(layered, "prometheus", tmp_path, "demo", "--quiet", "--epochs", "1", **pull).strip()
        == "runs/demo.jsonl"
    )


def test_grpc_extra_takes_the_grpc_protocol(layered: dict[str, Path], tmp_path: Path) -> None:
    out = _layer_runs(layered, "grpc", tmp_path, "doctor", OTEL_EXPORTER_OTLP_PROTOCOL="grpc")
    assert "(grpc)" in out and out.rstrip().endswith(DOCTOR_OFF)


def test_plot_extra_draws_the_demo_run(layered: dict[str, Path], tmp_path: Path) -> None:
    _layer_runs(layered, "plot", tmp_path, "demo", "--quiet", "--epochs", "2", "--output", "run.jsonl")
    assert _layer_runs(layered, "plot", tmp_path, "plot", "run.jsonl").strip() == "run.png"
    assert (tmp_path / "run.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize(
    ("extra", "base"), [("lightning", "lightning.pytorch.Callback"), ("transformers", "transformers.TrainerCallback")]
)
def test_framework_extras_import_the_callbacks(layered: dict[str, Path], tmp_path: Path, extra: str, base: str) -> None:
    module, _, name = base.rpartition(".")
    check = (
        f"import importlib; from tolaria_otel.{extra} import SeedLayerCallback; "
        f"callback = SeedLayerCallback({{}}); "
        f"assert isinstance(callback, getattr(importlib.import_module('{module}'), '{name}'))"
    )
    _ok(_run([str(layered[extra]), "-c", check], tmp_path))


def _oldest_python() -> Iterator[Path]:
    """Interpreters of the oldest Python ``requires-python`` admits: on PATH, or pyenv's."""
    floor = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"].removeprefix(">=")
    candidates = [Path(p) / f"python{floor}" for p in os.environ.get("PATH", "").split(os.pathsep)]
    candidates += sorted(Path.home().glob(f".pyenv/versions/{floor}.*/bin/python{floor}"))
    for candidate in candidates:
        if candidate.is_file() and _run([str(candidate), "--version"], ROOT).returncode == 0:
            yield candidate


def test_oldest_declared_python_installs_and_runs_the_package(dist: tuple[Path, Path], tmp_path: Path) -> None:
    oldest = next(_oldest_python(), None)
    assert oldest is not None, "no interpreter of the oldest Python requires-python admits: install it (pyenv)"
    python = _venv(tmp_path / "oldest", str(oldest))
    metadata, _ = _metadata(dist[1])
    core = [
        requirement
        for requirement in metadata.get_all("Requires-Dist")
        if "extra ==" not in requirement and not requirement.startswith("torch")
    ]
    _pip_install(python, "--no-deps", str(dist[1]))
    _pip_install(python, *core)
    _ok(_run([str(python), "-m", "compileall", "-q", str(_site_packages(python) / "tolaria_otel")], tmp_path))
    cli = str(python.parent / "tolaria-otel")
    assert _ok(_run([cli, "--version"], tmp_path)).startswith("tolaria-otel ")
    assert _ok(_run([cli, "doctor"], tmp_path)).rstrip().endswith(DOCTOR_OFF)
    _ok(_run([cli, "assets", "out"], tmp_path))
    _ok(
        _run(
            [str(python), "-c", "import tolaria_otel, tolaria_otel.export.provider, tolaria_otel.config.settings"],
            tmp_path,
        )
    )


def test_demo_needs_no_prometheus_exporter(tmp_path: Path) -> None:
    """The demo with rich and without the optional Prometheus exporter (as ``[demo]`` installs it), in
    this environment: the exporter's import is blocked. Main crashed here (``metrics_urls``)."""
    script = (
        "import sys; sys.modules['opentelemetry.exporter.prometheus'] = None; "
        "from tolaria_otel.cli import main; sys.exit(main(['demo', '--epochs', '1', '--output', 'd.jsonl']))"
    )
    env = _clean_env(PYTHONPATH=str(ROOT / "src"))
    assert "wrote 1 epochs to d.jsonl" in _ok(_run([sys.executable, "-c", script], tmp_path, env))
