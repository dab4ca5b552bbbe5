"""What ``doctor`` and ``demo`` make of bad, secret-bearing and irrelevant input.

Bad input: one line per problem on stderr, exit 2 (``demo``) or 1 (``doctor``), naming the variable
or option; never a traceback; never a secret (header values, a URL's user info or query string) in
any output, the SDK's own log lines included. ``doctor`` checks what the settings in force read
and only that. The cases run in process through ``main()`` (the console script's entry point);
those where the SDK's logging could print a secret also run as the installed script, which is
where a user would see it.
"""

from __future__ import annotations

import base64
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.stack import QuietHandler, http_server, victoria_metrics
from tests.test_cli import (  # noqa: F401 - fixtures: the environment is restored after each test
    OtlpReceiver,
    assert_one_line_error,
    clean_env,
    closed_port,
    isolated_environment,
    main_in_process,
    read_jsonl,
    receiver,
    run,
)
from tolaria_otel.cli.doctor_variables import OTEL_DEFAULTS

ROOT = Path(__file__).resolve().parents[1]
SECRET = "SECRET123"
Capsys = pytest.CaptureFixture[str]


def doctor(capsys: Capsys, *args: str, **env: str) -> tuple[int, str, list[str]]:
    """``tolaria-otel doctor`` in process with ``env`` added: status, stdout, the problem lines."""
    os.environ.update(env)
    code, out, err = main_in_process(["doctor", "--timeout", "1", *args], capsys)
    assert "Traceback" not in out + err
    problems = err.strip().splitlines()
    assert all(line.startswith("tolaria-otel doctor: ") for line in problems), problems
    return code, out, problems


def demo_refuses(capsys: Capsys, tmp_path: Path, *args: str, **env: str) -> str:
    """``tolaria-otel demo`` in process must refuse before training: its one error line."""
    os.environ.update(env)
    output = tmp_path / "never.jsonl"
    code, out, err = main_in_process(["demo", "--quiet", "--output", str(output), *args], capsys)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert err.startswith("tolaria-otel demo: error: ") and not output.exists()
    return err


# ------------------------------------------------------------------ malformed URLs
@pytest.mark.parametrize("url", ["http://[::1", "http://host:99999", "localhost:4318", "http://", "http://a b:1"])
def test_a_malformed_endpoint_is_one_problem_naming_the_variable(capsys: Capsys, tmp_path: Path, url: str) -> None:
    code, _, problems = doctor(capsys, OTEL_EXPORTER_OTLP_ENDPOINT=url, TOLARIA_SEED_LAYER_SUMMARIES_ENABLED="true")
    assert code == 1 and len(problems) == 1 and "OTEL_EXPORTER_OTLP_ENDPOINT=" in problems[0], problems
    assert "--otlp-endpoint" in demo_refuses(capsys, tmp_path, "--otlp-endpoint", url)
    assert "OTEL_EXPORTER_OTLP_ENDPOINT=" in demo_refuses(capsys, tmp_path, OTEL_EXPORTER_OTLP_ENDPOINT=url)


def test_a_malformed_endpoint_through_the_installed_script(tmp_path: Path) -> None:
    for args in (["doctor"], ["demo", "--quiet", "--output", str(tmp_path / "x.jsonl")]):
        result = run(
            *args, env=clean_env(OTEL_EXPORTER_OTLP_ENDPOINT="http://[::1", TOLARIA_SEED_LAYER_SUMMARIES_ENABLED="true")
        )
        assert_one_line_error(result)
        assert result.returncode == (1 if args == ["doctor"] else 2) and "OTEL_EXPORTER_OTLP_ENDPOINT" in result.stderr


# ------------------------------------------------------------------ secrets
SECRET_ENVIRONMENTS = {
    "header without =": {"OTEL_EXPORTER_OTLP_HEADERS": f"authorization Bearer {SECRET}"},
    "metrics header, non-ASCII": {"OTEL_EXPORTER_OTLP_METRICS_HEADERS": f"x-token=\u00e9{SECRET}"},
    "token as user name": {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://{SECRET}@127.0.0.1:{port}"},
    "user and password": {"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://user:{SECRET}@127.0.0.1:{port}/v1/metrics"},
    "query string": {"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://127.0.0.1:{port}/v1/metrics?api_key={SECRET}"},
    "malformed URL with a token": {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://{SECRET}@[::1"},
}


@pytest.mark.parametrize("case", SECRET_ENVIRONMENTS, ids=str)
def test_no_secret_in_any_output_of_the_installed_script(case: str, closed_port: int, tmp_path: Path) -> None:  # noqa: F811 - the fixture imported above
    env = {name: value.format(SECRET=SECRET, port=closed_port) for name, value in SECRET_ENVIRONMENTS[case].items()}
    env.update(TOLARIA_SEED_LAYER_SUMMARIES_ENABLED="true", OTEL_METRICS_EXPORTER="otlp")
    doctor_result = run("doctor", "--timeout", "1", env=clean_env(**env))
    assert doctor_result.returncode == 1 and "Traceback" not in doctor_result.stderr
    demo_result = run("demo", "--quiet", "--output", str(tmp_path / "x.jsonl"), env=clean_env(**env))
    assert_one_line_error(demo_result)
    assert demo_result.returncode == 2
    for result in (doctor_result, demo_result):
        assert SECRET not in result.stdout + result.stderr, result.stdout + result.stderr


def test_the_demo_option_never_prints_a_secret(capsys: Capsys, tmp_path: Path, closed_port: int) -> None:  # noqa: F811 - the fixture imported above
    for url in (
        f"http://{SECRET}@127.0.0.1:{closed_port}",
        f"http://u:{SECRET}@[::1",
        f"http://127.0.0.1:{closed_port}/v1/metrics?api_key={SECRET}",
    ):
        assert SECRET not in demo_refuses(capsys, tmp_path, "--otlp-endpoint", url)


def test_a_header_problem_names_the_entry_not_its_value(capsys: Capsys) -> None:
    code, out, problems = doctor(capsys, OTEL_EXPORTER_OTLP_HEADERS=f"x-team=ml,authorization Bearer {SECRET}")
    assert code == 1 and problems == [
        "tolaria-otel doctor: OTEL_EXPORTER_OTLP_HEADERS is not valid: entry 2 of 2 is not name=value in printable "
        "ASCII (not shown: it may hold a secret); expected comma-separated name=value pairs, special characters "
        "URL-encoded, e.g. authorization=Bearer%20TOKEN"
    ]
    # No name either: in a list that is not valid, what looks like a name may be the end of a value.
    assert re.search(r"^  OTEL_EXPORTER_OTLP_HEADERS +\*\*\* \(not valid, not shown\)  ", out, re.MULTILINE), out


def test_user_info_is_sent_as_basic_auth_and_never_shown(
    receiver: OtlpReceiver,  # noqa: F811 - the fixture imported above
    capsys: Capsys,
    tmp_path: Path,
) -> None:
    endpoint = receiver.url.replace("http://", f"http://trainer:{SECRET}@")
    code, out, problems = doctor(
        capsys, OTEL_EXPORTER_OTLP_ENDPOINT=endpoint, TOLARIA_SEED_LAYER_SUMMARIES_ENABLED="true"
    )
    assert code == 0 and problems == [] and SECRET not in out
    assert f"{receiver.url.replace('http://', 'http://***@')}/v1/metrics (http/protobuf): answers" in out
    expected = "Basic " + base64.b64encode(f"trainer:{SECRET}".encode()).decode()
    assert receiver.requests[-1][0]["authorization"] == expected
    # The demo accepts it too, and the SDK's exporter sends the same credentials with every export.
    output = tmp_path / "run.jsonl"
    result = run(
        "demo", "--quiet", "--epochs", "1", "--seeds", "2", "--output", str(output), "--otlp-endpoint", endpoint
    )
    assert result.returncode == 0 and SECRET not in result.stdout + result.stderr, result.stderr
    exports = [headers for headers, request in receiver.requests if request.resource_metrics]
    assert exports and all(headers["authorization"] == expected for headers in exports)
    assert len(read_jsonl(output)) == 1


# ------------------------------------------------------------------ numbers that never export
@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "0"),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "-1"),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "nan"),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "abc"),
        ("OTEL_EXPORTER_OTLP_METRICS_TIMEOUT", "inf"),
        ("OTEL_METRIC_EXPORT_INTERVAL", "inf"),
        ("OTEL_METRIC_EXPORT_INTERVAL", "0"),
        ("OTEL_METRIC_EXPORT_TIMEOUT", "-5"),
    ],
)
def test_numbers_that_would_never_export_are_refused(capsys: Capsys, tmp_path: Path, variable: str, value: str) -> None:
    code, _, problems = doctor(capsys, **{variable: value})
    assert code == 1 and len(problems) == 1 and f"{variable}={value!r} is not valid" in problems[0], problems
    assert f"{variable}={value!r} is not valid" in demo_refuses(
        capsys, tmp_path, **{variable: value, "OTEL_METRICS_EXPORTER": "otlp"}
    )


def test_a_timeout_meant_as_milliseconds_is_a_problem(capsys: Capsys) -> None:
    code, _, problems = doctor(capsys, OTEL_EXPORTER_OTLP_TIMEOUT="2000")
    assert code == 1 and len(problems) == 1, problems
    assert "OTEL_EXPORTER_OTLP_TIMEOUT='2000' is 2000 seconds (33 min) in the Python SDK" in problems[0]


# ------------------------------------------------------------------ pull mode
def test_doctor_finds_a_prometheus_port_in_use(capsys: Capsys) -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        code, _, problems = doctor(
            capsys,
            OTEL_METRICS_EXPORTER="prometheus",
            OTEL_EXPORTER_PROMETHEUS_HOST="127.0.0.1",
            OTEL_EXPORTER_PROMETHEUS_PORT=str(port),
        )
    assert code == 1 and len(problems) == 1 and f"OTEL_EXPORTER_PROMETHEUS_PORT={port} is not usable" in problems[0]


@pytest.mark.parametrize("host", ["no-such-host.invalid", "192.0.2.1", "exa mple"])
def test_doctor_finds_an_unusable_prometheus_host(capsys: Capsys, host: str) -> None:
    code, _, problems = doctor(
        capsys,
        OTEL_METRICS_EXPORTER="prometheus",
        OTEL_EXPORTER_PROMETHEUS_HOST=host,
        OTEL_EXPORTER_PROMETHEUS_PORT="0",
    )
    assert code == 1 and len(problems) == 1 and f"OTEL_EXPORTER_PROMETHEUS_HOST={host!r} is not" in problems[0]


def test_doctor_passes_a_usable_prometheus_address(capsys: Capsys) -> None:
    code, out, problems = doctor(
        capsys,
        OTEL_METRICS_EXPORTER="prometheus",
        OTEL_EXPORTER_PROMETHEUS_HOST="127.0.0.1",
        OTEL_EXPORTER_PROMETHEUS_PORT="0",
        TOLARIA_SEED_LAYER_SUMMARIES_ENABLED="true",
    )
    assert code == 0 and problems == [] and "pull mode: can listen on 127.0.0.1 port 0" in out
    assert "4 seeds of 3 layers: 98 series = " in out and "at every scrape" in out


def test_the_demo_in_pull_mode_prints_its_metrics_url(capsys: Capsys, tmp_path: Path) -> None:
    os.environ.update(
        OTEL_METRICS_EXPORTER="prometheus", OTEL_EXPORTER_PROMETHEUS_HOST="127.0.0.1", OTEL_EXPORTER_PROMETHEUS_PORT="0"
    )
    code, out, err = main_in_process(
        ["demo", "--epochs", "1", "--seeds", "2", "--output", str(tmp_path / "pull.jsonl")], capsys
    )
    assert code == 0, err
    assert re.search(r"^serving http://127\.0\.0\.1:[1-9]\d*/metrics while it trains$", out, re.MULTILINE), out


# ------------------------------------------------------------------ what matters for the settings in force
def test_feature_off_on_a_fresh_machine_says_nothing_will_be_measured(capsys: Capsys) -> None:
    # Whatever listens on localhost:4318 here (nothing, or another test's collector) does not matter.
    code, out, problems = doctor(capsys)
    assert code == 0 and problems == [], problems  # off is no problem ...
    assert "all is well" not in out  # ... but not all is well: nothing will be measured
    assert out.rstrip().splitlines()[-1] == (
        "nothing will be measured: TOLARIA_SEED_LAYER_SUMMARIES_ENABLED is off "
        "(set TOLARIA_SEED_LAYER_SUMMARIES_ENABLED=true to measure)"
    )
    assert (
        "OTLP endpoint: http://localhost:4318/v1/metrics (http/protobuf): not checked: "
        "TOLARIA_SEED_LAYER_SUMMARIES_ENABLED is off, nothing is exported" in out
    )
    assert re.search(
        r"^  TOLARIA_SEED_LAYER_TOPK +3  \(default\)  not used: TOLARIA_SEED_LAYER_SUMMARIES_ENABLED "
        r"is off$",
        out,
        re.MULTILINE,
    ), out


def test_feature_on_with_nothing_listening_is_a_problem(capsys: Capsys, closed_port: int) -> None:  # noqa: F811 - the fixture imported above
    code, _, problems = doctor(
        capsys,
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{closed_port}",
        TOLARIA_SEED_LAYER_SUMMARIES_ENABLED="true",
    )
    assert code == 1 and len(problems) == 1 and "does not answer" in problems[0], problems


def test_values_the_settings_in_force_do_not_read_are_marked_not_problems(capsys: Capsys) -> None:
    code, out, problems = doctor(
        capsys,
        OTEL_METRICS_EXPORTER="prometheus",
        OTEL_EXPORTER_PROMETHEUS_PORT="0",
        OTEL_EXPORTER_OTLP_TIMEOUT="abc",
        OTEL_METRIC_EXPORT_INTERVAL="soon",
    )
    assert code == 0 and problems == [], problems
    assert re.search(r"^  OTEL_EXPORTER_OTLP_TIMEOUT +abc  \(env; .*\)  not used: no otlp exporter$", out, re.MULTILINE)
    assert re.search(r"^  OTEL_METRIC_EXPORT_INTERVAL +soon  .*not used: no periodic exporter", out, re.MULTILINE)
    code, out, problems = doctor(capsys, OTEL_METRICS_EXPORTER="otlp", OTEL_EXPORTER_OTLP_METRICS_TIMEOUT="2")
    assert re.search(
        r"^  OTEL_EXPORTER_OTLP_TIMEOUT +abc  .*not used: OTEL_EXPORTER_OTLP_METRICS_TIMEOUT is set$", out, re.MULTILINE
    ), out
    assert problems == [] or all("OTEL_EXPORTER_OTLP_TIMEOUT=" not in p for p in problems)
    code, out, problems = doctor(capsys, OTEL_SDK_DISABLED="true")
    assert code == 0 and problems == [] and "OTEL_SDK_DISABLED=true: nothing is exported" in out


#: A bad value for every OTEL_* variable doctor lists (but OTEL_SERVICE_NAME, which takes any), with
#: what puts it in force.
BAD_VALUES = {
    "OTEL_SDK_DISABLED": ("1", {}),
    "OTEL_METRICS_EXPORTER": ("kafka", {}),
    "OTEL_EXPORTER_OTLP_PROTOCOL": ("http/json", {}),
    "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": ("carrier-pigeon", {}),
    "OTEL_EXPORTER_OTLP_ENDPOINT": ("ftp://collector", {}),
    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": ("http://[::1", {}),
    "OTEL_EXPORTER_OTLP_HEADERS": ("no-equals-sign", {}),
    "OTEL_EXPORTER_OTLP_METRICS_HEADERS": ('quoted="x"', {}),
    "OTEL_EXPORTER_OTLP_TIMEOUT": ("10s", {}),
    "OTEL_EXPORTER_OTLP_METRICS_TIMEOUT": ("-3", {}),
    "OTEL_EXPORTER_OTLP_COMPRESSION": ("zstd", {}),
    "OTEL_EXPORTER_OTLP_METRICS_COMPRESSION": ("brotli", {}),
    "OTEL_EXPORTER_OTLP_CERTIFICATE": ("/no/such/ca.pem", {"OTEL_EXPORTER_OTLP_ENDPOINT": "https://127.0.0.1:1"}),
    "OTEL_EXPORTER_OTLP_METRICS_CERTIFICATE": (
        "/no/such/ca.pem",
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "https://127.0.0.1:1"},
    ),
    "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE": (
        "/no/such/client.pem",
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "https://127.0.0.1:1"},
    ),
    "OTEL_EXPORTER_OTLP_METRICS_CLIENT_CERTIFICATE": (
        "/no/such/client.pem",
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "https://127.0.0.1:1"},
    ),
    "OTEL_EXPORTER_OTLP_CLIENT_KEY": ("/no/such/key.pem", {"OTEL_EXPORTER_OTLP_ENDPOINT": "https://127.0.0.1:1"}),
    "OTEL_EXPORTER_OTLP_METRICS_CLIENT_KEY": (
        "/no/such/key.pem",
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "https://127.0.0.1:1"},
    ),
    "OTEL_METRIC_EXPORT_INTERVAL": ("1e400", {}),
    "OTEL_METRIC_EXPORT_TIMEOUT": ("nan", {}),
    "OTEL_RESOURCE_ATTRIBUTES": ("service.instance.id", {}),
    "OTEL_EXPORTER_PROMETHEUS_HOST": (
        "no-such-host.invalid",
        {"OTEL_METRICS_EXPORTER": "prometheus", "OTEL_EXPORTER_PROMETHEUS_PORT": "0"},
    ),
    "OTEL_EXPORTER_PROMETHEUS_PORT": ("65536", {"OTEL_METRICS_EXPORTER": "prometheus"}),
}


def test_every_listed_variable_is_checked() -> None:
    assert set(BAD_VALUES) == set(OTEL_DEFAULTS) - {"OTEL_SERVICE_NAME"}


@pytest.mark.parametrize("variable", BAD_VALUES)
def test_doctor_checks_the_variable(capsys: Capsys, variable: str) -> None:
    value, context = BAD_VALUES[variable]
    # The feature off: the endpoint is not probed, so each case has exactly its own problem.
    code, _, problems = doctor(capsys, **context, **{variable: value})
    assert code == 1 and len(problems) == 1 and f"{variable}" in problems[0], problems


# ------------------------------------------------------------------ a receiver that wants a path
def test_a_store_that_wants_a_path_gets_a_url_to_try(capsys: Capsys, tmp_path: Path) -> None:
    with victoria_metrics(tmp_path / "vm") as vm:
        error = demo_refuses(capsys, tmp_path, "--otlp-endpoint", vm.url)
        assert f"OTLP endpoint {vm.url}/v1/metrics answered HTTP 400" in error
        assert error.rstrip().endswith(
            f"answers (VictoriaMetrics's OTLP path): try --otlp-endpoint {vm.url}/opentelemetry/v1/metrics"
        ), error
        code, _, problems = doctor(
            capsys, OTEL_EXPORTER_OTLP_ENDPOINT=vm.url, TOLARIA_SEED_LAYER_SUMMARIES_ENABLED="true"
        )
        assert code == 1 and problems[0].endswith(
            f"try OTEL_EXPORTER_OTLP_METRICS_ENDPOINT={vm.url}/opentelemetry/v1/metrics"
        ), problems
        # What it says to try works as given.
        output = tmp_path / "vm.jsonl"
        result = run(
            "demo",
            "--quiet",
            "--epochs",
            "1",
            "--seeds",
            "2",
            "--output",
            str(output),
            "--otlp-endpoint",
            f"{vm.url}/opentelemetry/v1/metrics",
        )
        assert result.returncode == 0, result.stderr
        assert vm.series("tolaria_grad_agg_seed_norm"), "the demo's export did not arrive"


def test_a_wrong_path_on_a_collector_gets_the_collectors_path(capsys: Capsys, tmp_path: Path) -> None:
    with OtlpReceiver() as receiver_:  # answers 404 on every path but /v1/metrics
        error = demo_refuses(capsys, tmp_path, "--otlp-endpoint", f"{receiver_.url}/otlp/wrong")
    assert (
        "answered HTTP 404" in error
        and "/v1/metrics answers (an OpenTelemetry Collector's OTLP path): try "
        f"--otlp-endpoint {receiver_.url}/v1/metrics"
        in error
    )


@pytest.fixture
def refusing_everything() -> Iterator[str]:
    """An HTTP server answering 404 to every request: no OTLP receiver on any path."""

    class NotFound(QuietHandler):
        def do_POST(self) -> None:
            self.send_error(404)

    with http_server(NotFound) as url:
        yield url


def test_a_server_with_no_otlp_path_gets_the_usual_urls(
    capsys: Capsys, tmp_path: Path, refusing_everything: str
) -> None:
    error = demo_refuses(capsys, tmp_path, "--otlp-endpoint", refusing_everything)
    assert (
        "answered HTTP 404" in error
        and "no OTLP/HTTP metrics receiver at that path; try the receiver's full "
        "URL in --otlp-endpoint (a Collector: http://HOST:4318/v1/metrics"
        in error
    )


# ------------------------------------------------------------------ long values
def test_a_100_kB_value_gives_short_lines(capsys: Capsys, tmp_path: Path) -> None:
    huge = "x" * 100_000
    for variables in (
        [
            "TOLARIA_SEED_LAYER_TOPK",
            "TOLARIA_SEED_HEALTH_COMPACT",
            "OTEL_EXPORTER_OTLP_TIMEOUT",
            "OTEL_METRIC_EXPORT_INTERVAL",
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "OTEL_SDK_DISABLED",
        ],
        ["OTEL_METRICS_EXPORTER", "OTEL_RESOURCE_ATTRIBUTES"],
    ):
        code, out, problems = doctor(capsys, **dict.fromkeys(variables, huge))
        assert code == 1 and len(problems) == len(variables), problems
        assert all(len(line) < 300 for line in problems), problems
        assert all("(100000 characters)" in line for line in problems if "RESOURCE" not in line), problems
        assert max(len(line) for line in out.splitlines()) < 300
        for name in variables:
            del os.environ[name]
    assert len(demo_refuses(capsys, tmp_path, "--otlp-endpoint", "http://" + huge)) < 300
