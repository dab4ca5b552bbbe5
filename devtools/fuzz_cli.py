"""Fuzz the command line's inputs and count what happens to them.

    .venv/bin/python -m devtools.fuzz_cli [--random N] [--seed S] [--show KIND]

Every variable ``tolaria-otel doctor`` lists gets hand-picked values (the mistakes the issues
found, the documented forms, junk a shell can produce) plus ``N`` random strings, one at a time,
in the context that puts it in force (``OTEL_METRICS_EXPORTER=prometheus`` for the Prometheus
variables, an ``https://`` endpoint for the certificate, ...). ``doctor`` runs on each; ``demo``
runs on each value that must be refused, and on the values of its own options, so that it stops
before training. Both run in this process through ``main()``, the console script's entry point,
with Python's logging printing to the captured stderr as it would in a terminal (the SDK's
warnings included), so an SDK line that echoes a value counts.

An oracle written here, apart from the package, says what each value is: ``ok`` (doctor must say
all is well), ``bad`` (doctor exit 1 and demo exit 2, each with a line naming the variable or
option), or ``flagged`` (valid, but doctor must report it: a timeout meant as milliseconds).
Outcomes, per input:

- clear: as the oracle says; one problem per line, starting with the command's name;
- silent wrong: a bad value passed, a good one refused, no line names the culprit, or a secret
  (the marker planted in headers, user info and query strings) reached the output;
- crash: an exception out of ``main()``, a traceback in the output, or another exit status.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import math
import os
import random
import re
import socket
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from devtools.stack import QuietHandler, http_server
from tolaria_otel.cli import main
from tolaria_otel.cli.doctor_variables import OTEL_DEFAULTS
from tolaria_otel.config.settings import VARIABLE_FIELDS

SECRET = "S3CR3T-MARKER"
HUGE = "7" * 100_000
JUNK = [
    "",
    " ",
    "\t",
    "x",
    "-1",
    "0",
    "1",
    "2",
    "nan",
    "inf",
    "-inf",
    "1e400",
    "\uff11",
    "\u00e9",
    "\x01",
    "true",
    "TRUE",
    "yes",
    "none",
    "a,b",
    "=",
    ",",
    "%",
    "'",
    '"',
    "\\",
    "${HOME}",
    "0x10",
    "1_000",
    " 5 ",
    HUGE,
]
RANDOM_ALPHABET = "abcxyz0189.:/@?=,-_ %[]\t\u00e9"


@dataclass(frozen=True)
class Case:
    command: str  # doctor or demo
    culprit: str  # the variable or option the value is given to
    value: str
    expected: str  # ok, bad or flagged
    env: dict[str, str]
    argv: list[str]


# ------------------------------------------------------------------ the oracle
def is_number(value: str) -> bool:
    try:
        float(value.strip())
    except ValueError:
        return False
    return True


def positive_finite(value: str) -> bool:
    return is_number(value) and math.isfinite(float(value)) and float(value) > 0


def integer_in(value: str, low: int, high: int) -> bool:
    text = value.strip()
    return text.isascii() and text.isdigit() and len(text) < 10 and low <= int(text) <= high


#: Esper's (pydantic's) boolean words, any case.
FLAG_WORDS = ("1", "true", "t", "yes", "y", "on", "0", "false", "f", "no", "n", "off")


def one_of(*words: str) -> Callable[[str], bool]:
    return lambda value: value.strip().lower() in words


def exporters_ok(value: str) -> bool:
    names = [name.strip().lower() for name in value.split(",") if name.strip()]
    return all(n in ("otlp", "prometheus", "console", "none") for n in names) and (
        "none" not in names or len(names) == 1
    )


def host_ok(host: str) -> bool:
    """An IPv6 address in brackets, or a name (internationalised ones in their ASCII form) or IPv4 address."""
    if host.startswith("["):
        return re.fullmatch(r"\[[0-9A-Fa-f:.]+\]", host) is not None
    try:
        ascii_host = host.encode("idna").decode()
    except UnicodeError:
        return False
    labels = ascii_host.removesuffix(".").split(".")
    return all(re.fullmatch(r"[A-Za-z0-9_-]{1,63}", label) for label in labels)


def endpoint_ok(value: str, base: bool = False) -> bool:
    """An OTLP/HTTP endpoint; ``base``: OTEL_EXPORTER_OTLP_ENDPOINT, to which the exporter appends /v1/metrics."""
    text = value.strip()
    match = re.fullmatch(r"https?://(?:[^@/?#]*@)?(\[[^\]]*\]|[^:/?#\[\]@]+)(?::(\d*))?([/?#]\S*)?", text)
    if not match or any(ord(c) <= 0x20 or ord(c) == 0x7F for c in text):
        return False
    port, tail = match[2], match[3] or ""
    # A fragment is never sent; an "@" after the host is user info that was not percent-encoded; a query in
    # the base URL would end up before the /v1/metrics the exporter appends.
    if "#" in tail or "@" in tail or (base and "?" in tail):
        return False
    return host_ok(match[1]) and (not port or 1 <= int(port) <= 65535)


def headers_ok(value: str) -> bool:
    for raw in value.split(","):
        entry = raw.strip(" \t")
        if entry and not re.fullmatch(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+[ \t]*=[ \t]*[ !#-+\--:<-\[\]-~]*", entry):
            return False
        if entry and not entry.partition("=")[2].strip(" \t="):  # a value split at a comma ('Basic X,Y==')
            return False
    return True


def resource_ok(value: str) -> bool:
    return all("=" in entry and entry.split("=", 1)[0].strip() for entry in value.split(","))


def bindable(host: str, port: int) -> bool:
    """Whether a server could listen on host:port now (the oracle's own check, with the socket API)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
    except (OSError, UnicodeError, ValueError):
        return False
    return True


#: The mutual TLS variables, each with the one it needs beside it.
CLIENT_TLS = {
    "CLIENT_CERTIFICATE": "CLIENT_KEY",
    "CLIENT_KEY": "CLIENT_CERTIFICATE",
    "METRICS_CLIENT_CERTIFICATE": "METRICS_CLIENT_KEY",
    "METRICS_CLIENT_KEY": "METRICS_CLIENT_CERTIFICATE",
}


def verdict(variable: str, value: str) -> str:
    """ok, bad or flagged: what ``value`` is for ``variable``, by the documented contract."""
    if not value.strip():
        # Blank counts as unset; a client certificate or key is fuzzed with its partner set (contexts()),
        # and one without the other is refused.
        return "bad" if variable.removeprefix("OTEL_EXPORTER_OTLP_") in CLIENT_TLS else "ok"
    rules: dict[str, Callable[[str], bool]] = {
        "TOLARIA_SEED_LAYER_SUMMARIES_ENABLED": one_of(*FLAG_WORDS),
        "TOLARIA_SEED_HEALTH_COMPACT": one_of(*FLAG_WORDS),
        "TOLARIA_SEED_HOST_NORM": one_of(*FLAG_WORDS),
        # Each alone, the other at its default (1e-7 and 10): the vanishing bound must stay below the exploding one.
        "TOLARIA_SEED_TENSOR_VANISHING_BELOW": lambda v: positive_finite(v) and float(v) < 10,
        "TOLARIA_SEED_TENSOR_EXPLODING_ABOVE": lambda v: positive_finite(v) and float(v) > 1e-7,
        "TOLARIA_SEED_LAYER_TOPK": lambda v: integer_in(v, 1, 1_000_000),
        "TOLARIA_SEED_LAYER_MAX_SEEDS": lambda v: integer_in(v, 1, 1_000_000),
        "TOLARIA_SEED_STEP_NORM_HISTOGRAM": one_of("coarse", "fine", "off"),
        "TOLARIA_SEED_LAYER_SAMPLE_EVERY": lambda v: integer_in(v, 1, 1_000_000),
        "TOLARIA_SEED_LAYER_EXPORT_RANK": lambda v: integer_in(v, 0, 1_000_000),
        "OTEL_SDK_DISABLED": one_of("true", "false"),
        "OTEL_METRICS_EXPORTER": exporters_ok,
        "OTEL_EXPORTER_OTLP_PROTOCOL": one_of("http/protobuf", "grpc"),
        "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": one_of("http/protobuf", "grpc"),
        "OTEL_EXPORTER_OTLP_ENDPOINT": lambda value: endpoint_ok(value, base=True),
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": endpoint_ok,
        "OTEL_EXPORTER_OTLP_HEADERS": headers_ok,
        "OTEL_EXPORTER_OTLP_METRICS_HEADERS": headers_ok,
        "OTEL_EXPORTER_OTLP_TIMEOUT": positive_finite,
        "OTEL_EXPORTER_OTLP_METRICS_TIMEOUT": positive_finite,
        "OTEL_EXPORTER_OTLP_COMPRESSION": one_of("none", "gzip", "deflate"),
        "OTEL_EXPORTER_OTLP_METRICS_COMPRESSION": one_of("none", "gzip", "deflate"),
        "OTEL_EXPORTER_OTLP_CERTIFICATE": lambda v: os.path.isfile(v) and os.access(v, os.R_OK),
        "OTEL_EXPORTER_OTLP_METRICS_CERTIFICATE": lambda v: os.path.isfile(v) and os.access(v, os.R_OK),
        **{f"OTEL_EXPORTER_OTLP_{kind}": lambda v: os.path.isfile(v) and os.access(v, os.R_OK) for kind in CLIENT_TLS},
        "OTEL_METRIC_EXPORT_INTERVAL": positive_finite,
        "OTEL_METRIC_EXPORT_TIMEOUT": positive_finite,
        "OTEL_SERVICE_NAME": lambda v: True,
        "OTEL_RESOURCE_ATTRIBUTES": resource_ok,
        "OTEL_EXPORTER_PROMETHEUS_HOST": lambda v: bindable(v.strip(), 0),
        "OTEL_EXPORTER_PROMETHEUS_PORT": lambda v: integer_in(v, 0, 65535) and bindable("127.0.0.1", int(v)),
    }
    if not rules[variable](value):
        return "bad"
    if variable.endswith("_TIMEOUT") and "OTLP" in variable and float(value) > 60:
        return "flagged"  # seconds in the Python SDK: surely meant as milliseconds
    return "ok"


# ------------------------------------------------------------------ the corpus
def contexts(certificate: str, receiver: str) -> dict[str, dict[str, str]]:
    """What puts each variable in force. The feature stays off but where it is fuzzed itself, so that
    doctor probes no endpoint; when it is on, the endpoint is ``receiver``, which answers."""
    pull = {
        "OTEL_METRICS_EXPORTER": "prometheus",
        "OTEL_EXPORTER_PROMETHEUS_HOST": "127.0.0.1",
        "OTEL_EXPORTER_PROMETHEUS_PORT": "0",
    }
    https = {"OTEL_EXPORTER_OTLP_ENDPOINT": "https://127.0.0.1:4318"}
    # A client certificate is fuzzed with its key in place (a readable file), and the other way round.
    client = {
        f"OTEL_EXPORTER_OTLP_{kind}": {**https, f"OTEL_EXPORTER_OTLP_{partner}": certificate}
        for kind, partner in CLIENT_TLS.items()
    }
    return {
        "OTEL_EXPORTER_PROMETHEUS_HOST": pull,
        "OTEL_EXPORTER_PROMETHEUS_PORT": pull,
        "OTEL_EXPORTER_OTLP_CERTIFICATE": https,
        "OTEL_EXPORTER_OTLP_METRICS_CERTIFICATE": https,
        **client,
        "OTEL_METRICS_EXPORTER": {"OTEL_EXPORTER_PROMETHEUS_PORT": "0"},
        "TOLARIA_SEED_LAYER_SUMMARIES_ENABLED": {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver},
    }


def picked(variable: str, busy_port: int, certificate: str) -> list[str]:
    """Hand-picked values per variable: documented forms and the mistakes users make."""
    endpoints = [
        "http://localhost:4318",
        "https://collector.example:4318/",
        "http://[::1]:4318",
        "http://[::1",
        "localhost:4318",
        "http://",
        "http://host:99999",
        "http://host:0",
        "ftp://collector",
        "http://a b:1",
        f"http://{SECRET}@127.0.0.1:4318",
        f"http://user:{SECRET}@127.0.0.1:4318",
        f"http://127.0.0.1:4318/v1/metrics?api_key={SECRET}",
        f"http://{SECRET}@[::1",
        "http://exa!mple:1",
        "http://" + "a" * 64 + ":1",
        "http://" + HUGE,
        "http://h\u00e9:1",
    ]
    headers = [
        "authorization=Bearer abc",
        "a=1,b=2",
        " x-team = ml ",
        "authorization=Bearer%20abc",
        f"authorization Bearer {SECRET}",
        f"x-token=\u00e9{SECRET}",
        f'x="{SECRET}"',
        f"k={SECRET};v",
        f"=novalue{SECRET}",
        "a=1,,b=2",
        f"a=1,{SECRET}",
    ]
    numbers = ["2", "0.5", "10", "2000", "60", "61", "0", "-1", "nan", "inf", "abc", "10s", "1e400", "1e-300"]
    per_variable = {
        "OTEL_METRICS_EXPORTER": [
            "otlp",
            "prometheus",
            "console",
            "none",
            "otlp,console",
            " OTLP ",
            "kafka",
            "none,otlp",
            "otlp;console",
            "prometheus,otlp",
        ],
        "OTEL_EXPORTER_OTLP_PROTOCOL": ["grpc", "http/protobuf", "GRPC", "http/json", "http"],
        "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": ["grpc", "http/protobuf", "http/json"],
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoints,
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": endpoints,
        "OTEL_EXPORTER_OTLP_HEADERS": headers,
        "OTEL_EXPORTER_OTLP_METRICS_HEADERS": headers,
        "OTEL_EXPORTER_OTLP_TIMEOUT": numbers,
        "OTEL_EXPORTER_OTLP_METRICS_TIMEOUT": numbers,
        "OTEL_METRIC_EXPORT_INTERVAL": [*numbers, "15000", "60000"],
        "OTEL_METRIC_EXPORT_TIMEOUT": [*numbers, "5000"],
        "OTEL_EXPORTER_OTLP_COMPRESSION": ["gzip", "deflate", "none", "GZIP", "zstd", "brotli"],
        "OTEL_EXPORTER_OTLP_METRICS_COMPRESSION": ["gzip", "zstd"],
        "OTEL_EXPORTER_OTLP_CERTIFICATE": [certificate, "/no/such/ca.pem", tempfile.gettempdir()],
        "OTEL_EXPORTER_OTLP_METRICS_CERTIFICATE": [certificate, "/no/such/ca.pem"],
        **{
            f"OTEL_EXPORTER_OTLP_{kind}": [certificate, "/no/such/client.pem", tempfile.gettempdir()]
            for kind in CLIENT_TLS
        },
        "OTEL_RESOURCE_ATTRIBUTES": ["service.instance.id=run-42", "a=1,b=2", "a=b,", "novalue", "=x", "a=b=c"],
        "OTEL_SERVICE_NAME": ["tolaria", "trainer 7"],
        "OTEL_EXPORTER_PROMETHEUS_HOST": [
            "localhost",
            "127.0.0.1",
            "0.0.0.0",
            "::1",
            "no-such-host.invalid",
            "192.0.2.1",
            "exa mple",
            "256.1.1.1",
            "[::1]",
        ],
        "OTEL_EXPORTER_PROMETHEUS_PORT": ["0", "9464", str(busy_port), "65535", "65536", "-1", "http", " 0 "],
        "OTEL_SDK_DISABLED": ["true", "false", "True", "1", "yes", "disabled"],
    }
    return per_variable.get(variable, []) + JUNK


def random_values(rng: random.Random, count: int) -> list[str]:
    return ["".join(rng.choice(RANDOM_ALPHABET) for _ in range(rng.randint(1, 24))) for _ in range(count)]


def demo_option_cases() -> Iterator[Case]:
    """The demo's options, each given a value it must refuse before any training."""
    bad = {
        "--epochs": ["0", "1001", "-1", "x", "1.5", "\uff11"],
        "--seeds": ["1", "5", "99", "two"],
        "--top-k": ["0", "1000001", "many"],
        "--seed": ["-1", str(2**32), "x"],
        "--device": ["tpu", "cuda:x", "cuda:-1", "meta", HUGE],
        "--otlp-endpoint": [
            "http://[::1",
            "localhost:4318",
            "http://",
            f"http://{SECRET}@[::1",
            f"http://u:{SECRET}@exa mple:1",
            "ftp://x",
            "http://" + HUGE,
            "http://h:0",
        ],
    }
    for option, values in bad.items():
        for value in values:
            yield Case("demo", option, value, "bad", {}, ["demo", "--quiet", option, value])


def cases(rng: random.Random, count: int, busy_port: int, certificate: str, receiver: str) -> Iterator[Case]:
    context = contexts(certificate, receiver)
    for variable in [*VARIABLE_FIELDS, *OTEL_DEFAULTS]:
        for value in picked(variable, busy_port, certificate) + random_values(rng, count):
            expected = verdict(variable, value)
            env = {**context.get(variable, {}), variable: value}
            yield Case("doctor", variable, value, expected, env, ["doctor", "--timeout", "0.5"])
            if expected == "bad":
                # The demo exports over OTLP here, so that every OTEL_* variable is in force for it too.
                demo_env = {"OTEL_METRICS_EXPORTER": "otlp", **env, "TOLARIA_SEED_LAYER_SUMMARIES_ENABLED": "false"}
                if variable == "TOLARIA_SEED_LAYER_SUMMARIES_ENABLED":
                    demo_env[variable] = value
                yield Case("demo", variable, value, "bad", demo_env, ["demo", "--quiet"])
    yield from demo_option_cases()


# ------------------------------------------------------------------ running and judging
@contextlib.contextmanager
def otlp_receiver() -> Iterator[str]:
    """An endpoint that takes OTLP/HTTP exports (answers 200 to any POST): its base URL."""

    class Accept(QuietHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

    with http_server(Accept) as url:
        yield url


def run_case(case: Case, output_dir: str) -> tuple[str, str]:
    """(outcome, detail): clear, silent wrong or crash."""
    saved = dict(os.environ)
    for name in [n for n in os.environ if n.startswith(("OTEL_", "TOLARIA_"))]:
        del os.environ[name]
    os.environ.update(case.env)
    argv = [*case.argv, *(["--output", os.path.join(output_dir, "x.jsonl")] if case.command == "demo" else [])]
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 1
    except Exception as error:  # noqa: BLE001 - a crash is what is being counted
        return "crash", f"{type(error).__name__}: {str(error)[:200]}"
    finally:
        os.environ.clear()
        os.environ.update(saved)
    text = out.getvalue() + err.getvalue()
    lines = err.getvalue().strip().splitlines()
    if "Traceback" in text or code not in (0, 1, 2):
        return "crash", f"exit {code}: {text[-300:]}"
    if SECRET in text:
        return "silent wrong", "secret in the output"
    refused = code == (1 if case.command == "doctor" else 2)
    prefix = f"tolaria-otel {case.command}"
    if case.expected == "ok":
        return ("clear", "") if code == 0 and not lines else ("silent wrong", f"refused: {err.getvalue()[:300]}")
    if not refused:
        return "silent wrong", f"exit {code}, accepted"
    if not all(line.startswith(prefix) for line in lines) or not any(case.culprit in line for line in lines):
        return "silent wrong", f"no line names {case.culprit}: {err.getvalue()[:300]}"
    if max(len(line) for line in lines) > 400:
        return "silent wrong", "a line longer than 400 characters"
    return "clear", ""


def main_(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--random", type=int, default=40, help="random values per variable (default 40)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--show",
        choices=["crash", "silent wrong", "clear"],
        action="append",
        default=[],
        help="print each case with this outcome",
    )
    args = parser.parse_args(argv)
    # As in a terminal: Python's last-resort handler prints the SDK's warnings to (the captured) stderr.
    logging.lastResort = logging.StreamHandler(sys.stderr)
    logging.lastResort.setLevel(logging.WARNING)
    rng = random.Random(args.seed)
    tally: Counter[tuple[str, str]] = Counter()
    with tempfile.TemporaryDirectory() as scratch, socket.socket() as busy, otlp_receiver() as receiver:
        busy.bind(("127.0.0.1", 0))
        busy.listen()  # a Prometheus port some other program holds
        certificate = os.path.join(scratch, "ca.pem")
        with open(certificate, "w") as ca:
            ca.write("-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n")
        for case in cases(rng, args.random, busy.getsockname()[1], certificate, receiver):
            outcome, detail = run_case(case, scratch)
            group = f"{case.command}, {'options' if case.culprit.startswith('--') else 'environment'}"
            tally[(group, outcome)] += 1
            tally[(group, "tried")] += 1
            tally[(group, f"expected {case.expected}")] += 1
            if outcome in args.show:
                print(
                    f"{outcome}: {case.command} {case.culprit}={case.value[:60]!r} ({case.expected}) {detail}",
                    file=sys.stderr,
                )
    print("| inputs | tried | clear (refused / accepted as they should be) | silent wrong | crashes |")
    print("| --- | --- | --- | --- | --- |")
    groups = sorted({group for group, _ in tally})
    for group in [*groups, "all"]:

        def count(key: str, group: str = group) -> int:
            return sum(n for (g, k), n in tally.items() if k == key and (group == "all" or g == group))

        bad = count("expected bad") + count("expected flagged")
        print(
            f"| {group} | {count('tried')} | {count('clear')} ({bad} bad, {count('expected ok')} good) | "
            f"{count('silent wrong')} | {count('crash')} |"
        )
    return 1 if tally_has(tally, "crash") or tally_has(tally, "silent wrong") else 0


def tally_has(tally: Counter[tuple[str, str]], outcome: str) -> bool:
    return any(n for (_, key), n in tally.items() if key == outcome)


if __name__ == "__main__":
    sys.exit(main_())
