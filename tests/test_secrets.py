"""No secret in any line the package prints, or that the OpenTelemetry SDK prints because of it.

Secrets are planted in every form the OTLP variables take them: an endpoint's user info (with ``/ # ? @ :``
as written and percent-encoded, a token as the user name), a query string, a fragment, headers (well formed,
percent-encoded, and malformed every way: no ``=``, a comma inside a value, non-ASCII, quotes, an empty name),
on the general and the per-signal ``OTEL_EXPORTER_OTLP_METRICS_*`` variables, over OTLP/HTTP and gRPC. For each
environment: ``doctor`` (feature on, so the endpoint is probed), ``demo`` (its error path), and
``configure_meter_provider`` with a real training run whose final export goes to a real local socket that
refuses the connection or answers 503, so that the exporter logs its "Transient error ... retrying" line;
an environment the package refuses gives its ``ConfigurationError`` instead. Every line written to the
process's stdout and stderr (file-descriptor level, so the gRPC core's own output counts) and every log record
(root at DEBUG: urllib3's request lines count too) is searched for each secret and its recognisable forms:
as written, percent-encoded, base64 (HTTP basic auth), and each run of five or more letters and digits.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import sys
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.stack import QuietHandler, http_server
from tests.test_cli import closed_port, isolated_environment, main_in_process  # noqa: F401 - fixtures
from tolaria_otel import ConfigurationError, SeedLayerSettings

from .pipeline_run import Run

pytestmark = pytest.mark.slow

# Each secret is made of 5-character chunks found nowhere else, joined by the characters that break URLs and
# header lists, so that a cut or re-encoded copy still shows one of the chunks.
PASSWORD = "Pw4xq/Kz8Rb#Tn3Vy?Hm6Lc@Gd2Fs:Jq9Np"
USER = "Us7rNameQ"
TOKEN = "Tk5Wd2Zp8Ym3Xc"
API_KEY = "Ak9Jh/Ry4Bn+Qv7Mt="
HEADER_TOKEN = "Hb6Ge3Sw0Cq,Pd1Lz=="
HEADER_KEY = "Xk2Vr8Nm5Ff"
FRAGMENT = "Fr8Gm2Ks6Tw"
SECRETS = (PASSWORD, USER, TOKEN, API_KEY, HEADER_TOKEN, HEADER_KEY, FRAGMENT)

q = urllib.parse.quote


def forms(secret: str) -> set[str]:
    """What would give ``secret`` away in a line: itself, encoded, or a chunk of it."""
    found = {
        secret,
        q(secret, safe=""),
        q(secret),
        urllib.parse.quote_plus(secret),
        base64.b64encode(secret.encode()).decode().rstrip("="),
    }
    return found | set(re.findall(r"[A-Za-z0-9]{5,}", secret))


BASIC = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()

#: name -> (environment, what must happen: "refused" at start, or "exported" to the failing endpoint). ``{port}``
#: is the failing endpoint's port; ``{scheme}`` http.
CASES: dict[str, tuple[dict[str, str], str]] = {
    # ---- user info
    "password with / as written": (
        {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://user:{PASSWORD}@127.0.0.1:{{port}}"},
        "refused",
    ),
    "password with # only": ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://user:Pw4xq#Kz8Rb@127.0.0.1:{port}"}, "refused"),
    "password with ? only": (
        {"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://user:Pw4xq?Kz8Rb@127.0.0.1:{port}/v1/metrics"},
        "refused",
    ),
    "password with digits then /": (
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://user:12345/Kz8Rb@127.0.0.1:{port}"},
        "refused",
    ),
    "password with @ and :": ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://user:Pw4xq@Kz:8Rb@127.0.0.1:{port}"}, "either"),
    "user info percent-encoded": (
        {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{q(USER, safe='')}:{q(PASSWORD, safe='')}@127.0.0.1:{{port}}"},
        "exported",
    ),
    "token as user name": ({"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{TOKEN}@127.0.0.1:{{port}}"}, "exported"),
    "metrics endpoint with user info": (
        {"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": f"http://{USER}:{q(PASSWORD, safe='')}@127.0.0.1:{{port}}/v1/metrics"},
        "exported",
    ),
    "malformed URL with a token": ({"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{TOKEN}@[::1"}, "refused"),
    # ---- query strings and fragments
    "query string credential": (
        {"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": f"http://127.0.0.1:{{port}}/v1/metrics?api_key={q(API_KEY, safe='')}"},
        "exported",
    ),
    "query string as written": (
        {"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": f"http://127.0.0.1:{{port}}/v1/metrics?api_key={API_KEY}&x={TOKEN}"},
        "exported",
    ),
    "query string on the base endpoint": (
        {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{{port}}?api_key={TOKEN}"},
        "refused",
    ),
    "fragment": (
        {"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": f"http://127.0.0.1:{{port}}/v1/metrics#{FRAGMENT}"},
        "refused",
    ),
    "user info and query together": (
        {
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": f"http://{USER}:{q(PASSWORD, safe='')}@127.0.0.1:{{port}}"
            f"/v1/metrics?token={TOKEN}"
        },
        "exported",
    ),
    # ---- headers
    "bearer token, percent-encoded": (
        {"OTEL_EXPORTER_OTLP_HEADERS": f"authorization=Bearer%20{TOKEN},x-api-key={HEADER_KEY}"},
        "exported",
    ),
    "bearer token as written": ({"OTEL_EXPORTER_OTLP_HEADERS": f"authorization=Bearer {TOKEN}"}, "exported"),
    "basic auth header": ({"OTEL_EXPORTER_OTLP_HEADERS": f"authorization=Basic%20{BASIC}"}, "exported"),
    "comma inside a value": ({"OTEL_EXPORTER_OTLP_HEADERS": f"authorization=Basic {HEADER_TOKEN}"}, "refused"),
    "comma inside a value, encoded": (
        {"OTEL_EXPORTER_OTLP_HEADERS": f"authorization=Basic%20{q(HEADER_TOKEN, safe='')}"},
        "exported",
    ),
    "header without =": ({"OTEL_EXPORTER_OTLP_HEADERS": f"x-team=ml,authorization Bearer {TOKEN}"}, "refused"),
    "header, non-ASCII value": ({"OTEL_EXPORTER_OTLP_METRICS_HEADERS": f"x-token=\u00e9{HEADER_KEY}"}, "refused"),
    "header, quoted value": ({"OTEL_EXPORTER_OTLP_HEADERS": f'x-token="{HEADER_KEY}"'}, "refused"),
    "header, empty name": ({"OTEL_EXPORTER_OTLP_HEADERS": f"={HEADER_KEY}"}, "refused"),
    "header, semicolon": ({"OTEL_EXPORTER_OTLP_HEADERS": f"x-token={HEADER_KEY};v=1"}, "refused"),
    "header, a bare token": ({"OTEL_EXPORTER_OTLP_HEADERS": f"a=1,{TOKEN}"}, "refused"),
    "header, name only, value empty": ({"OTEL_EXPORTER_OTLP_HEADERS": f"x-token={HEADER_KEY},{TOKEN}="}, "refused"),
    "per-signal headers over general ones": (
        {"OTEL_EXPORTER_OTLP_METRICS_HEADERS": f"x-api-key={HEADER_KEY}", "OTEL_EXPORTER_OTLP_HEADERS": f"x-t={TOKEN}"},
        "exported",
    ),
    # ---- gRPC
    "grpc with a header token": (
        {
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:{port}",
            "OTEL_EXPORTER_OTLP_HEADERS": f"authorization=Bearer%20{TOKEN}",
        },
        "exported",
    ),
    "grpc per-signal": (
        {
            "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "grpc",
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://127.0.0.1:{port}",
            "OTEL_EXPORTER_OTLP_METRICS_HEADERS": f"x-api-key={HEADER_KEY}",
        },
        "exported",
    ),
    "grpc with user info": (
        {
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{USER}:{q(PASSWORD, safe='')}@127.0.0.1:{{port}}",
        },
        "refused",
    ),
    "grpc with a query string": (
        {
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{{port}}/?api_key={TOKEN}",
        },
        "refused",
    ),
    "grpc with a malformed header": (
        {
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:{port}",
            "OTEL_EXPORTER_OTLP_HEADERS": f"authorization Bearer {TOKEN}",
        },
        "refused",
    ),
}


class Unavailable(QuietHandler):
    """A receiver that is down for maintenance: 503 to every export (retryable, so the exporter logs it)."""

    def do_POST(self) -> None:  # http.server's naming
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(503)
        self.end_headers()


@pytest.fixture(params=["refused", "503"])
def failing_port(request: pytest.FixtureRequest, closed_port: int) -> Iterator[int]:  # noqa: F811
    if request.param == "refused":
        yield closed_port
    else:
        with http_server(Unavailable) as url:
            yield int(url.rsplit(":", 1)[1])


def leaks(text: str) -> list[str]:
    return sorted({form for secret in SECRETS for form in forms(secret) if form in text})


def logged(caplog: pytest.LogCaptureFixture) -> str:
    """Every record as a handler would write it (traceback included), and its message on its own."""
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    return "\n".join(f"{formatter.format(record)}\n{record.getMessage()}" for record in caplog.records)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_no_secret_in_any_output(
    case: str, failing_port: int, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    environment, expected = CASES[case]
    os.environ.update({name: value.format(port=failing_port) for name, value in environment.items()})
    if not any("ENDPOINT" in name for name in environment):  # a header case: the failing endpoint too
        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{failing_port}"
    os.environ.update(
        {
            "TOLARIA_SEED_LAYER_SUMMARIES_ENABLED": "true",
            "OTEL_METRIC_EXPORT_INTERVAL": "60000",
            "OTEL_EXPORTER_OTLP_TIMEOUT": "2.5",
            "OTEL_SERVICE_NAME": "secrets-test",
        }
    )
    caplog.set_level(logging.DEBUG)  # every logger of the process at DEBUG: urllib3's request lines too

    # Doctor: a refused value or an endpoint that does not answer is a problem (gRPC is probed with a TCP
    # connection, which the 503 server takes). Demo: refused before training, or trained and exported.
    code, _, _ = main_in_process(["doctor", "--timeout", "0.5"], capfd)
    assert code in (0, 1) if "grpc" in case else code == 1
    code, _, _ = main_in_process(["demo", "--quiet", "--epochs", "1", "--output", str(tmp_path / "d.jsonl")], capfd)
    assert code in (0, 2) if "grpc" in case else code == 2

    outcome = "exported"
    try:
        # Interval exports only: the final export, at shutdown, is the one that fails (and retries, and logs).
        run = Run("secrets", settings=SeedLayerSettings(enabled=True, top_k=2), export_each_epoch=False)
    except ConfigurationError as error:
        outcome = "refused"
        print(error, file=sys.stderr)  # searched below with the rest
    else:
        run.epoch(steps=2)
        run.close()  # the final export: to a port that refuses, or a server that answers 503
        # The exporter's retry line; or, where an older exporter does not retry a refused connection, the
        # reader's log of the exception it raised (with the traceback, whose text holds the URL).
        failed = ("Transient error", "Exception while exporting metrics")
        logged_failure = [r for r in caplog.records if r.getMessage().startswith(failed)]
        assert logged_failure, "the export's failure was not logged: the path under test did not run"
    assert expected in (outcome, "either"), f"{case}: {outcome}, expected {expected}"

    captured = capfd.readouterr()
    everything = "\n".join([captured.out, captured.err, logged(caplog)])
    assert not leaks(everything), f"{case}: {leaks(everything)} in:\n{everything}"


# ------------------------------------------------------------------ headers read as the exporter reads them
def test_a_comma_inside_a_value_is_refused_because_the_exporter_splits_there() -> None:
    from opentelemetry.util.re import parse_env_headers

    from tolaria_otel.config.otel_env import otlp_headers

    raw = f"authorization=Basic {HEADER_TOKEN}"
    sent = dict(parse_env_headers(raw, liberal=True))  # what the OTLP exporters would send: the SDK itself
    assert sent["authorization"] != f"Basic {HEADER_TOKEN}" and len(sent) == 2, sent
    with pytest.raises(ConfigurationError, match=r"entry 2 of 2 has an empty value .* %2C") as refused:
        otlp_headers({"OTEL_EXPORTER_OTLP_HEADERS": raw})
    assert not leaks(str(refused.value))
    encoded = f"authorization=Basic%20{q(HEADER_TOKEN, safe='')}"
    assert (
        otlp_headers({"OTEL_EXPORTER_OTLP_HEADERS": encoded})
        == dict(parse_env_headers(encoded, liberal=True))
        == {"authorization": f"Basic {HEADER_TOKEN}"}
    )


@pytest.mark.parametrize(
    "url",
    [
        f"http://user:{PASSWORD}@collector.example:4318/v1/metrics",
        f"http://{TOKEN}@collector.example:4318",
        f"https://{USER}:{q(PASSWORD, safe='')}@collector.example:4318/v1/metrics?api_key={API_KEY}#{FRAGMENT}",
        f"http://collector.example:4318/v1/metrics?api_key={API_KEY}",
        f"http://u:{PASSWORD}@[::1",
        f"collector.example/v1?{TOKEN}",
    ],
)
def test_a_url_is_shown_without_user_info_query_or_fragment(url: str) -> None:
    from tolaria_otel.config.redaction import redacted_url

    shown = redacted_url(url)
    assert not leaks(shown), shown
    assert "collector.example" in shown or "[::1" in shown


def test_a_traceback_logged_by_the_sdk_is_masked_too(caplog: pytest.LogCaptureFixture) -> None:
    """The periodic reader logs an exporter's exception with its traceback, whose text may hold the URL."""
    from tolaria_otel.config.redaction import install_log_redaction

    install_log_redaction({"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": f"http://h:1/v1/metrics?api_key={TOKEN}"})
    logger = logging.getLogger("opentelemetry.sdk.metrics._internal.export")
    try:
        raise ConnectionError(f"cannot reach /v1/metrics?api_key={TOKEN} (key {TOKEN})")
    except ConnectionError:
        logger.exception("Exception while exporting metrics")
    assert "Exception while exporting metrics" in caplog.text and "ConnectionError" in caplog.text
    assert not leaks(caplog.text), caplog.text
