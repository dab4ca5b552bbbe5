"""The ``tolaria-otel`` command line.

The demo runs as a person runs it: the installed console script, in a subprocess, with a clean
environment; OTLP goes to a real OTLP/HTTP receiver on loopback that decodes what the SDK's
exporter sends. The many bad-input cases and ``doctor`` run in process through ``main()``, which
is the console script's entry point, to keep the suite fast (each subprocess pays torch's import).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)

from devtools.stack import QuietHandler, http_server
from tolaria_otel import LAYER_NORM, SEED_NORM, EpochSummary, SeedLayerSettings, SettingsError
from tolaria_otel.cli import main
from tolaria_otel.config import settings
from tolaria_otel.config.settings import VARIABLE_FIELDS
from tolaria_otel.export.volume import trainer_series

SCRIPT = Path(sys.executable).with_name("tolaria-otel")
ROOT = Path(__file__).resolve().parents[1]
DEADLINE_S = 60.0


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "TOLARIA_"))}
    env.update(extra)
    return env


def run(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    assert SCRIPT.exists(), f"{SCRIPT} is missing: install the package (make install)"
    return subprocess.run(
        [str(SCRIPT), *args], capture_output=True, text=True, env=env or clean_env(), cwd=cwd, timeout=120, check=False
    )


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_one_line_error(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("tolaria-otel"), result.stderr


@pytest.fixture(autouse=True)
def isolated_environment() -> Iterator[None]:
    """In-process commands read and set os.environ: start each test without OTEL_* and TOLARIA_*
    variables and put the environment back afterwards."""
    saved = dict(os.environ)
    for name in [n for n in os.environ if n.startswith(("OTEL_", "TOLARIA_"))]:
        del os.environ[name]
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def main_in_process(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``tolaria-otel ARGV`` in this process (fast: no interpreter and torch start-up): status, stdout, stderr."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


class OtlpReceiver:
    """A real OTLP/HTTP endpoint on loopback: keeps every decoded export request and its headers."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], ExportMetricsServiceRequest]] = []
        lock = threading.Lock()
        requests = self.requests

        class Handler(QuietHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path != "/v1/metrics":
                    self.send_error(404)
                    return
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                request = ExportMetricsServiceRequest.FromString(body)
                with lock:
                    requests.append(({k.lower(): v for k, v in self.headers.items()}, request))
                reply = ExportMetricsServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

        self._handler = Handler
        self._serving = ExitStack()
        self.url = ""

    def __enter__(self) -> OtlpReceiver:  # noqa: PYI034 - typing.Self needs Python 3.11
        self.url = self._serving.enter_context(http_server(self._handler))
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._serving.close()

    def snapshots(self) -> list[dict[tuple[str, str, str, str], float]]:
        """Per export request with seed points: (metric, seed_id, stage, layer) -> value."""
        out = []
        for _, request in self.requests:
            points: dict[tuple[str, str, str, str], float] = {}
            for resource_metrics in request.resource_metrics:
                resource = {a.key: a.value.string_value for a in resource_metrics.resource.attributes}
                assert resource["service.name"] == "tolaria"
                for scope_metrics in resource_metrics.scope_metrics:
                    for metric in scope_metrics.metrics:
                        if metric.name not in (LAYER_NORM, SEED_NORM):
                            continue
                        for point in metric.gauge.data_points:
                            attributes = {a.key: a.value.string_value for a in point.attributes}
                            key = (metric.name, attributes["seed_id"], attributes["stage"], attributes.get("layer", ""))
                            points[key] = point.as_double
            if points:
                out.append(points)
        return out


def expected_snapshot(record: dict[str, Any]) -> dict[tuple[str, str, str, str], float]:
    points = {}
    for seed in record["seeds"]:
        points[(SEED_NORM, seed["seed_id"], seed["stage"], "")] = seed["total_norm"]
        for layer in seed["top_layers"]:
            points[(LAYER_NORM, seed["seed_id"], seed["stage"], layer["layer"])] = layer["value"]
    return points


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as server:
        yield server


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port bound but not listening for the whole test: connections to it are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def test_version() -> None:
    from tolaria_otel import __version__

    result = run("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"tolaria-otel {__version__}"


@pytest.mark.parametrize("command", [[], ["demo"], ["doctor"]], ids=lambda c: " ".join(c) or "top")
def test_help_on_every_command(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = main_in_process([*command, "--help"], capsys)
    assert code == 0 and out.startswith(" ".join(["usage: tolaria-otel", *command]))


def test_demo_defaults_need_no_server_and_write_runs_jsonl(tmp_path: Path) -> None:
    result = run("demo", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "exporters: none" in result.stdout and "wrote 6 epochs to runs/demo.jsonl" in result.stdout
    assert "FOSSILIZED" in result.stdout and "CULLED" in result.stdout and "epoch 5" in result.stdout
    records = read_jsonl(tmp_path / "runs" / "demo.jsonl")
    assert [r["epoch"] for r in records] == list(range(6))
    stages = {(r["epoch"], s["seed_id"]): s["stage"].removeprefix("SEED_STAGE_") for r in records for s in r["seeds"]}
    steps = {(r["epoch"], s["seed_id"]): s["sampled_steps"] for r in records for s in r["seeds"]}
    assert [stages.get((e, "seed-0")) for e in range(6)] == ["GERMINATED", "TRAINING", "BLENDING"] + ["FOSSILIZED"] * 3
    # Germinated right after epoch 0 ended: measured from epoch 1's first step. Culled: not measured, then gone.
    assert [stages.get((e, "seed-1")) for e in range(6)] == [None, "GERMINATED", "TRAINING", "BLENDING", "CULLED", None]
    assert steps[(1, "seed-1")] == 16
    # Germinated mid-epoch: measured from that step, over the 8 steps it was there.
    assert [stages.get((e, "seed-2")) for e in range(6)] == [None, "GERMINATED", "TRAINING", "BLENDING"] + [
        "FOSSILIZED"
    ] * 2
    assert [stages.get((e, "seed-3")) for e in range(6)] == [
        None,
        None,
        "GERMINATED",
        "TRAINING",
        "BLENDING",
        "FOSSILIZED",
    ]
    assert steps[(1, "seed-2")] == steps[(2, "seed-3")] == 8
    for record in records:
        assert set(record) == {field.name for field in dataclasses.fields(EpochSummary)} | {"loss"}  # every field
        assert record["clip_steps"] == 0 and record["min_clip_factor"] is None  # the demo does not clip
        assert record["host_norm"] > 0  # the demo measures the host
        assert record["sampled_steps"] == 16 and record["top_k"] == 3 and math.isfinite(record["loss"])
        for seed in record["seeds"]:
            culled = seed["stage"] == "SEED_STAGE_CULLED"
            assert (seed["total_norm"] is None) == culled  # not measured, never a zero
            values = [layer["value"] for layer in seed["top_layers"]]
            assert seed["layer_count"] == 5
            assert len(values) == (0 if culled else 3) and values == sorted(values, reverse=True)
            assert seed["health"] == ("not_measured" if culled else "healthy")
            assert (seed["host_ratio"] is None) == culled and sum(seed["step_norm_counts"]) == seed["sampled_steps"] * (
                not culled
            )


def test_plot_renders_a_demo_file_and_rejects_a_bad_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from matplotlib.image import imread

    for name in ("TOLARIA_SEED_LAYER_SUMMARIES_ENABLED", "OTEL_METRICS_EXPORTER"):
        monkeypatch.delenv(name, raising=False)  # the demo sets its defaults; restore them afterwards

    summaries = tmp_path / "run.jsonl"
    assert main(["demo", "--quiet", "--epochs", "2", "--seeds", "2", "--output", str(summaries)]) == 0
    assert main(["plot", str(summaries)]) == 0
    image = imread(tmp_path / "run.png")
    assert image.shape[0] > 100 and image.std() > 0.05  # drawn on, not a blank canvas
    (tmp_path / "bad.jsonl").write_text("not json\n")
    capsys.readouterr()
    assert main(["plot", str(tmp_path / "bad.jsonl")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("tolaria-otel plot: error:") and error.count("\n") == 1


def test_demo_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    args = ("demo", "--quiet", "--epochs", "4", "--seeds", "3", "--top-k", "2", "--seed", "7")
    first, second = tmp_path / "a" / "run.jsonl", tmp_path / "b" / "run.jsonl"
    runs = [
        subprocess.Popen(
            [str(SCRIPT), *args, "--output", str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=clean_env(),
        )
        for path in (first, second)
    ]
    for path, process in zip((first, second), runs):  # side by side: they must not depend on timing either
        stdout, stderr = process.communicate(timeout=120)
        assert process.returncode == 0 and stdout.strip() == str(path), stderr
    assert first.read_bytes() == second.read_bytes()
    records = read_jsonl(first)
    assert len(records) == 4 and {s["seed_id"] for r in records for s in r["seeds"]} == {"seed-0", "seed-1", "seed-2"}
    assert all(len(s["top_layers"]) == 2 for r in records for s in r["seeds"])


def test_demo_exports_every_epoch_over_otlp(tmp_path: Path, receiver: OtlpReceiver) -> None:
    output = tmp_path / "otlp.jsonl"
    result = run("demo", "--quiet", "--epochs", "4", "--otlp-endpoint", receiver.url, "--output", str(output))
    assert result.returncode == 0, result.stderr
    records = read_jsonl(output)
    snapshots = receiver.snapshots()
    for record in records:
        assert expected_snapshot(record) in snapshots, f"epoch {record['epoch']} did not reach the receiver"
    assert snapshots[-1] == expected_snapshot(records[-1])  # the shutdown export repeats the last epoch


def test_demo_respects_the_feature_switched_off(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    os.environ["TOLARIA_SEED_LAYER_SUMMARIES_ENABLED"] = "false"
    output = tmp_path / "off.jsonl"
    code, out, err = main_in_process(["demo", "--quiet", "--epochs", "1", "--output", str(output)], capsys)
    assert code == 0 and out.strip() == str(output), err
    assert "TOLARIA_SEED_LAYER_SUMMARIES_ENABLED is off" in err
    assert output.read_text() == ""


def test_ctrl_c_stops_cleanly_with_every_finished_epoch(tmp_path: Path, receiver: OtlpReceiver) -> None:
    output, stdout = tmp_path / "interrupted.jsonl", tmp_path / "stdout.txt"
    with stdout.open("w") as out:
        process = subprocess.Popen(
            [str(SCRIPT), "demo", "--epochs", "1000", "--output", str(output), "--otlp-endpoint", receiver.url],
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
            env=clean_env(),
        )
        try:
            deadline = time.monotonic() + DEADLINE_S
            while not (output.exists() and output.read_text().count("\n") >= 1):
                assert process.poll() is None, process.communicate()[1]
                assert time.monotonic() < deadline, "no epoch finished in time"
                time.sleep(0.05)
            process.send_signal(signal.SIGINT)
            _, stderr = process.communicate(timeout=DEADLINE_S)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr + stdout.read_text()
    records = read_jsonl(output)
    assert 1 <= len(records) < 1000 and [r["epoch"] for r in records] == list(range(len(records)))
    assert f"interrupted after {len(records)} finished epochs" in stderr
    assert receiver.snapshots()[-1] == expected_snapshot(records[-1])  # flushed and shut down


def test_bad_input_to_the_installed_script() -> None:
    result = run("demo", "--seeds", "99")
    assert_one_line_error(result)
    assert result.returncode == 2 and result.stdout == ""


def test_unreachable_endpoint_is_one_line_error(tmp_path: Path, closed_port: int) -> None:
    result = run("demo", "--output", str(tmp_path / "x.jsonl"), "--otlp-endpoint", f"http://127.0.0.1:{closed_port}")
    assert_one_line_error(result)
    assert "does not answer" in result.stderr and not (tmp_path / "x.jsonl").exists()


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--bogus"],
        ["frobnicate"],
        ["demo", "--bogus"],
        ["demo", "--epochs", "0"],
        ["demo", "--epochs", "1001"],
        ["demo", "--seeds", "1"],
        ["demo", "--seeds", "99"],
        ["demo", "--top-k", "many"],
        ["demo", "--seed", "-1"],
        ["demo", "--device", "tpu"],
        ["demo", "--device", "cuda:x"],
        ["demo", "--otlp-endpoint", "localhost:4318"],
        ["doctor", "--seeds", "0"],
        ["doctor", "--timeout", "0"],
    ],
    ids=lambda args: " ".join(args) or "no-command",
)
def test_bad_options_give_one_line_errors(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = main_in_process(args, capsys)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("tolaria-otel"), err


@pytest.mark.parametrize(
    "variable, value, more",
    [
        ("TOLARIA_SEED_LAYER_TOPK", "abc", {}),
        ("TOLARIA_SEED_LAYER_SUMMARIES_ENABLED", "perhaps", {}),
        ("OTEL_METRICS_EXPORTER", "kafka", {}),
        ("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "carrier-pigeon", {"OTEL_METRICS_EXPORTER": "otlp"}),
    ],
)
def test_bad_environment_fails_the_demo_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], variable: str, value: str, more: dict[str, str]
) -> None:
    os.environ.update({variable: value, **more})
    code, out, err = main_in_process(["demo", "--output", str(tmp_path / "x.jsonl")], capsys)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert variable in err and not (tmp_path / "x.jsonl").exists()


def test_demo_without_cuda_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    code, _, err = main_in_process(["demo", "--device", "cuda"], capsys)
    assert code == 2 and "CUDA is not available" in err and len(err.strip().splitlines()) == 1


def test_unwritable_output_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    # A path under a regular file: unwritable even for root.
    code, _, err = main_in_process(["demo", "--output", str(blocker / "demo.jsonl")], capsys)
    assert code == 2 and "cannot write --output" in err and len(err.strip().splitlines()) == 1


def test_doctor_all_well_masks_secrets(receiver: OtlpReceiver, capsys: pytest.CaptureFixture[str]) -> None:
    os.environ.update(
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url,
        OTEL_EXPORTER_OTLP_HEADERS="authorization=Bearer s3cret",
        TOLARIA_SEED_LAYER_SUMMARIES_ENABLED="true",
        OTEL_METRIC_EXPORT_INTERVAL="15000",
    )
    code, out, err = main_in_process(["doctor", "--seeds", "4"], capsys)
    assert code == 0, err
    assert "s3cret" not in out + err and "authorization=***" in out
    for name in env_example():
        assert re.search(rf"^  {name} ", out, re.MULTILINE), f"{name} missing from doctor's report"
    assert re.search(r"TOLARIA_SEED_LAYER_SUMMARIES_ENABLED +true  \(env; default: false\)$", out, re.MULTILINE)
    assert re.search(r"TOLARIA_SEED_LAYER_TOPK +3  \(default\)$", out, re.MULTILINE)
    # 4 seeds x (top 3 layer_norm and layer_norm_max, norm, norm_max, 16 coarse histogram series) + info + budget
    assert (
        "98 series = 4 exported seeds x 24 (2 x 3 per-layer (top 3 of 3 layers), 2 seed totals, "
        "16 step_norm histogram (coarse)) + 2 per trainer; every 15 s: 6.53 samples per second" in out
    )
    assert f"{receiver.url}/v1/metrics (http/protobuf): answers" in out
    headers, _ = receiver.requests[-1]
    assert headers["authorization"] == "Bearer s3cret"


def test_doctor_reports_one_line_per_problem(closed_port: int, capsys: pytest.CaptureFixture[str]) -> None:
    os.environ.update(
        TOLARIA_SEED_LAYER_TOPK="0",
        TOLARIA_SEED_HEALTH_COMPACT="maybe",
        TOLARIA_SEED_LAYER_SUMMARIES_ENABLED="on",
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{closed_port}",
        OTEL_METRIC_EXPORT_INTERVAL="soon",
    )
    code, _, err = main_in_process(["doctor", "--timeout", "1"], capsys)
    assert code == 1
    problems = err.strip().splitlines()
    assert len(problems) == 4 and all(p.startswith("tolaria-otel doctor: ") for p in problems), problems
    for needle in (
        "TOLARIA_SEED_LAYER_TOPK='0'",
        "TOLARIA_SEED_HEALTH_COMPACT='maybe'",
        "OTEL_METRIC_EXPORT_INTERVAL='soon'",
        "does not answer",
    ):
        assert sum(needle in p for p in problems) == 1, (needle, problems)


@pytest.mark.parametrize(
    ("top_k", "compact", "histogram", "seeds", "layers"),
    [
        ("3", "false", "fine", "4", "3"),
        ("5", "false", "coarse", "4", "3"),
        ("3", "true", "off", "4", "3"),
        ("3", "false", "coarse", "1000", "5"),
        ("8", "false", "off", "2", "5"),
    ],
)
def test_doctor_volume_is_the_counted_one(
    top_k: str, compact: str, histogram: str, seeds: str, layers: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """doctor prints volume.trainer_series, the count tests/test_volume.py checks against real stores."""
    os.environ.update(
        TOLARIA_SEED_LAYER_SUMMARIES_ENABLED="true",
        TOLARIA_SEED_LAYER_TOPK=top_k,
        TOLARIA_SEED_HEALTH_COMPACT=compact,
        TOLARIA_SEED_STEP_NORM_HISTOGRAM=histogram,
        OTEL_METRICS_EXPORTER="none",
    )
    code, out, _ = main_in_process(["doctor", "--seeds", seeds, "--layers", layers], capsys)
    assert code == 0
    expected = sum(trainer_series(SeedLayerSettings.from_env(), int(seeds), int(layers)).values())
    assert f"volume for {seeds} seeds of {layers} layers: {expected} series = {seeds} exported seeds x " in out


def test_doctor_says_when_seeds_would_not_be_exported(capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 17.6: on main `doctor --seeds 1000` said all is well while 333 seeds exported no layer."""
    os.environ.update(
        TOLARIA_SEED_LAYER_SUMMARIES_ENABLED="true", TOLARIA_SEED_LAYER_MAX_SEEDS="600", OTEL_METRICS_EXPORTER="none"
    )
    code, out, err = main_in_process(["doctor", "--seeds", "1000", "--layers", "5"], capsys)
    assert code == 1
    assert "1000 seeds of 5 layers: " in out and "= 600 exported seeds x " in out
    assert err.strip() == (
        "tolaria-otel doctor: --seeds 1000 is above TOLARIA_SEED_LAYER_MAX_SEEDS=600: 400 seeds "
        "would not be exported (the last by seed id); raise TOLARIA_SEED_LAYER_MAX_SEEDS to "
        "export them"
    )


def env_example() -> dict[str, str]:
    """.env.example's variables: name -> default (commented-out OTEL_* lines included)."""
    found = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        match = re.fullmatch(r"#? ?((?:TOLARIA|OTEL)_[A-Z_]+)=(.*)", line.strip())
        if match:
            found[match[1]] = match[2]
    return found


def readme_configuration() -> tuple[dict[str, str], set[str]]:
    """README's ``## Configuration`` tables: TOLARIA_* name -> default, and every OTEL_* name."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    tolaria = dict(re.findall(r"^\| `(TOLARIA_[A-Z_]+)` \| `([^`]*)` \|", section, re.MULTILINE))
    otel = set(re.findall(r"`(OTEL_[A-Z_]+)`", section))
    return tolaria, otel


def test_env_example_readme_and_settings_agree() -> None:
    names = {value for key, value in vars(settings).items() if key.startswith("ENV_")}
    example = env_example()
    readme, readme_otel = readme_configuration()
    assert set(VARIABLE_FIELDS) == names  # doctor shows every variable
    assert set(readme) == names
    assert {name for name in example if name.startswith("TOLARIA_")} == names
    defaults = SeedLayerSettings()
    for name in names:
        assert readme[name] == example[name], name
        # The documented default is accepted and is the default: it changes nothing.
        assert SeedLayerSettings.from_env({name: example[name]}) == defaults, name
        with pytest.raises(SettingsError, match=name):  # and the variable is really read
            SeedLayerSettings.from_env({name: "not-a-value"})
    assert readme_otel <= set(example), readme_otel - set(example)


#: A valid value other than the default for each field: reading it must change that field and no other.
OTHER_VALUES = {
    "enabled": "true",
    "top_k": "5",
    "compact": "yes",
    "sample_every": "2",
    "export_rank": "1",
    "host_norm": "on",
    "max_seeds": "7",
    "step_norm_histogram": "fine",
    "tensor_vanishing_below": "1e-6",
    "tensor_exploding_above": "20",
}


def test_each_variable_of_the_table_sets_its_field_and_only_it() -> None:
    defaults = SeedLayerSettings()
    assert set(VARIABLE_FIELDS.values()) == {field.name for field in dataclasses.fields(SeedLayerSettings)}
    for name, field in VARIABLE_FIELDS.items():
        read = SeedLayerSettings.from_env({name: OTHER_VALUES[field]})
        changed = {f.name for f in dataclasses.fields(read) if getattr(read, f.name) != getattr(defaults, f.name)}
        assert changed == {field}, name
