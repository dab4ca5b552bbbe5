"""Start and stop real observability backends (VictoriaMetrics, Prometheus, the Collector) on loopback.

The binaries come from Debian packages, fetched by ``make backends``: VictoriaMetrics and Prometheus
unpacked by devtools/fetch_backends.sh into ``.cache/backends/root/usr/bin``, the OpenTelemetry Collector
built from source by devtools/otelcol/build.sh into ``.cache/otelcol/otelcol``; no Docker.

Used by the tests (fixtures wrap the context managers below) and by people:
``python -m devtools.stack`` runs the whole chain (Collector -> VictoriaMetrics -> Prometheus) until Ctrl-C.

Stdlib only, so it works in any venv and in CI without extra installs.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parents[1]
BACKENDS_BIN = REPO_ROOT / ".cache" / "backends" / "root" / "usr" / "bin"
COLLECTOR_BINARY = REPO_ROOT / ".cache" / "otelcol" / "otelcol"
COLLECTOR_DIR = REPO_ROOT / "collector"
#: The Collector config of the path a core Collector can run: OTLP in, OTLP/HTTP into the store.
STORE_COLLECTOR_CONFIG = COLLECTOR_DIR / "otel-collector-store.yaml"
#: Nissa's Prometheus on that path: federates the store.
STORE_PROMETHEUS_CONFIG = COLLECTOR_DIR / "prometheus-store.yml"
#: The store's address in STORE_PROMETHEUS_CONFIG (VictoriaMetrics' default port), replaced by the real one.
STORE_DEFAULT_ADDRESS = "127.0.0.1:8428"

STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
HTTP_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class BackendBinaries:
    prometheus: Path
    promtool: Path
    victoria_metrics: Path


def backend_binaries(bin_dir: Path = BACKENDS_BIN) -> BackendBinaries:
    """Paths of the fetched binaries; a clear error (not a skip) when they are missing."""
    binaries = BackendBinaries(
        prometheus=bin_dir / "prometheus",
        promtool=bin_dir / "promtool",
        victoria_metrics=bin_dir / "victoria-metrics",
    )
    missing = [str(p) for p in vars(binaries).values() if not os.access(p, os.X_OK)]
    if missing:
        raise RuntimeError(
            f"observability backends missing ({', '.join(missing)}); "
            "run `make backends` (bash devtools/fetch_backends.sh) first"
        )
    return binaries


def collector_binary(path: Path = COLLECTOR_BINARY) -> Path:
    """The Collector built by ``make backends``; a clear error (not a skip) when it is missing."""
    if not os.access(path, os.X_OK):
        raise RuntimeError(
            f"OpenTelemetry Collector missing ({path}); run `make backends` (bash devtools/otelcol/build.sh) first"
        )
    return path


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now.

    There is a small race until the server binds it; acceptable for loopback
    tests, and the startup error names the port if it ever happens.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class QuietHandler(BaseHTTPRequestHandler):
    """A request handler that logs nothing: a test's output stays its own."""

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def http_server(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """An in-process HTTP server on a free loopback port, served from a daemon thread: yields its base URL.

    It listens once constructed, so it is ready when the URL is yielded; it is stopped on the way out.
    """
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    interval: float = 0.05,
    message: str = "condition not met",
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that.

    Polls against a total deadline instead of sleeping a fixed time, so tests
    are as fast as the backend allows and fail with ``message`` otherwise.
    Exceptions listed in ``ignore`` count as "not yet" (e.g. a backend that is
    still restarting); the last one is reported on timeout.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except ignore as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise TimeoutError(f"{message} after {timeout:.1f}s{detail}")
        time.sleep(interval)


def _get(url: str, params: dict[str, str] | None = None, method: str = "GET") -> bytes:
    if params:
        url = f"{url}?{urllib.parse.urlencode(params)}"
    request = urllib.request.Request(url, method=method)
    with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
        return bytes(response.read())


def _api(url: str, params: dict[str, str] | None = None) -> Any:
    """Call a Prometheus-style JSON API and return its ``data``."""
    try:
        body = _get(url, params)
    except urllib.error.HTTPError as exc:
        # Bad queries come back as 4xx with a JSON error; surface that text.
        raise RuntimeError(f"{url} {params}: HTTP {exc.code}: {exc.read().decode(errors='replace')}") from exc
    payload = json.loads(body)
    if payload.get("status") != "success":
        raise RuntimeError(f"{url} {params}: {payload}")
    return payload["data"]


def _die_with_parent() -> None:
    # Linux: SIGKILL the server if the process that started it dies (e.g. a
    # killed pytest), so no orphan keeps a port and a data dir busy.
    # Note: strictly it fires when the *thread* that forked exits.
    PR_SET_PDEATHSIG = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class _Server:
    """A server process on a fixed port, restartable on that same port and data dir."""

    name = "server"
    ready_path = "/"

    def __init__(self, binary: Path, tmp_dir: Path, port: int | None = None) -> None:
        self.binary = binary
        self.tmp_dir = Path(tmp_dir)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.tmp_dir / f"{self.name}.log"
        #: Added to this process's environment for the server.
        self.env: dict[str, str] = {}
        self._process: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        raise NotImplementedError

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def _ready(self) -> bool:
        assert self._process is not None
        if self._process.poll() is not None:
            raise RuntimeError(f"exited with code {self._process.returncode}")
        try:
            _get(self.url + self.ready_path)
            return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False  # not listening / not ready (503) yet

    def start(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        if self.running:
            return
        # Append: a restart keeps the earlier run's log for post-mortems.
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                self.argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.tmp_dir,
                env={**os.environ, **self.env},
                # Own session: Ctrl-C in a terminal goes to us only, and we
                # stop the servers in order instead of them dying mid-write.
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,  # noqa: PLW1509 - one prctl, no lock
            )
        try:
            wait_until(self._ready, timeout, message=f"{self.name} not ready at {self.url}{self.ready_path}")
        except (RuntimeError, TimeoutError) as exc:
            self.stop()
            raise RuntimeError(
                f"{self.name} failed to start ({exc}); command: {' '.join(self.argv())}\n"
                f"--- tail of {self.log_path} ---\n{self.log_tail()}"
            ) from exc

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Graceful stop (SIGTERM lets the server flush its data), SIGKILL if it hangs."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGCONT)  # a hung (stopped) server could not act on SIGTERM
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)

    def kill(self) -> None:
        """Crash the server (SIGKILL, no flush): for fault-injection tests."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(STOP_TIMEOUT_S)

    def restart(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        self.stop()
        self.start(timeout)

    def hang(self) -> None:
        """Freeze the server (SIGSTOP): the kernel still accepts connections, nothing answers them."""
        assert self._process is not None and self._process.poll() is None, f"{self.name} is not running"
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Undo ``hang()`` (SIGCONT): the server answers again, queued connections included."""
        assert self._process is not None, f"{self.name} is not running"
        self._process.send_signal(signal.SIGCONT)


class VictoriaMetrics(_Server):
    name = "victoria-metrics"
    ready_path = "/health"

    def __init__(self, binary: Path, tmp_dir: Path, port: int | None = None, extra_args: Sequence[str] = ()) -> None:
        super().__init__(binary, tmp_dir, port)
        self.data_dir = self.tmp_dir / "vm-data"
        self.extra_args = list(extra_args)
        self.otlp_metrics_url = f"{self.url}/opentelemetry/v1/metrics"

    def argv(self) -> list[str]:
        return [
            str(self.binary),
            f"-httpListenAddr=127.0.0.1:{self.port}",
            f"-storageDataPath={self.data_dir}",
            # OTLP names/labels -> Prometheus style (dots to "_", unit suffix),
            # the names our dashboards and alert rules use.
            "-opentelemetry.usePrometheusNaming",
            # Instant queries default to now-30s; use "now" so a sample that
            # was just exported is what a query returns.
            "-search.latencyOffset=0s",
            # No response cache: a query must reflect every sample ingested
            # before it, or tests become order dependent.
            "-search.disableCache",
            # Persist in-memory parts every second (the minimum), so a
            # SIGKILL in a fault-injection test loses at most ~1 s of data.
            "-inmemoryDataFlushInterval=1s",
            *self.extra_args,
        ]

    def flush(self) -> None:
        """Make everything ingested so far searchable now.

        VictoriaMetrics buffers incoming rows (~2 s) and caches index lookups,
        so without this a fresh series can take seconds (up to ~10 s for regex
        matchers) to appear; /internal/force_flush is its documented test hook.
        """
        _get(self.url + "/internal/force_flush")

    def query(self, promql: str, at: float | None = None, flush: bool = True) -> list[dict[str, Any]]:
        """Instant query at ``at`` (default: now); returns the ``result`` list."""
        if flush:
            self.flush()
        # Always send the time: VM rounds an omitted "now" down to the whole
        # second, which hides a sample exported <1 s ago for up to a second.
        params = {"query": promql, "time": f"{time.time() if at is None else at:.3f}"}
        return list(_api(self.url + "/api/v1/query", params)["result"])

    def export(self, match: str, flush: bool = True) -> list[dict[str, Any]]:
        """Every raw sample of the series matching ``match``: ``[{"metric", "values", "timestamps"}]``."""
        if flush:
            self.flush()
        lines = _get(self.url + "/api/v1/export", {"match[]": match}).decode().splitlines()
        return [json.loads(line) for line in lines if line]

    def series(self, match: str, flush: bool = True) -> list[dict[str, str]]:
        """Label sets of the series matching ``match`` (a series selector)."""
        if flush:
            self.flush()
        return list(_api(self.url + "/api/v1/series", {"match[]": match}))


class Prometheus(_Server):
    name = "prometheus"
    ready_path = "/-/ready"

    def __init__(
        self,
        binary: Path,
        tmp_dir: Path,
        config_file: Path,
        port: int | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        super().__init__(binary, tmp_dir, port)
        self.config_file = config_file
        self.data_dir = self.tmp_dir / "prometheus-data"
        self.extra_args = list(extra_args)

    def argv(self) -> list[str]:
        return [
            str(self.binary),
            f"--web.listen-address=127.0.0.1:{self.port}",
            f"--storage.tsdb.path={self.data_dir}",
            f"--config.file={self.config_file}",
            # POST /-/reload, so a test can change rules without a restart.
            "--web.enable-lifecycle",
            *self.extra_args,
        ]

    def query(self, promql: str, at: float | None = None) -> list[dict[str, Any]]:
        params = {"query": promql}
        if at is not None:
            params["time"] = str(at)
        return list(_api(self.url + "/api/v1/query", params)["result"])

    def alerts(self) -> list[dict[str, Any]]:
        return list(_api(self.url + "/api/v1/alerts")["alerts"])

    def targets(self) -> list[dict[str, Any]]:
        """The active scrape targets (with ``health``, ``lastError``, ``labels``)."""
        return list(_api(self.url + "/api/v1/targets")["activeTargets"])

    def reload(self) -> None:
        """Re-read the config and rule files (edit them in place first)."""
        _get(self.url + "/-/reload", method="POST")

    def wait_for(
        self, predicate: Callable[[], T], timeout: float = 30.0, message: str = "prometheus condition not met"
    ) -> T:
        """``wait_until`` with defaults suited to scrape / rule-evaluation intervals.

        Prometheus 2.53 applies new scrape targets at most every 5 s (a fixed
        throttle; its hidden --scrape.discovery-reload-interval cannot go
        lower), so the first scrape lands ~5 s after start whatever the
        scrape_interval: keep timeouts well above that.
        """
        return wait_until(predicate, timeout, interval=0.1, message=message)


class Collector(_Server):
    """An OpenTelemetry Collector running config files of collector/ unchanged, merged in the given order.

    The shipped configs read every address from ``OTELCOL_*`` variables with loopback defaults, so here each
    gets a free port: the OTLP receivers (``self.port`` is OTLP/HTTP, ``self.grpc_port`` OTLP/gRPC) and the
    Collector's own telemetry. ``env`` adds the rest, e.g. ``OTELCOL_STORE_OTLP_ENDPOINT``.
    """

    def __init__(
        self,
        binary: Path,
        tmp_dir: Path,
        configs: Sequence[Path],
        env: Mapping[str, str] | None = None,
        name: str = "otelcol",
    ) -> None:
        self.name = name  # before super(): names the log file
        super().__init__(binary, tmp_dir)
        self.configs = [Path(config).resolve() for config in configs]
        self.grpc_port = free_port()
        self.telemetry_port = free_port()
        #: What a trainer's OTEL_EXPORTER_OTLP_ENDPOINT is set to, per OTEL_EXPORTER_OTLP_PROTOCOL.
        self.otlp_endpoints = {"http/protobuf": self.url, "grpc": f"http://127.0.0.1:{self.grpc_port}"}
        self.env = {
            "OTELCOL_OTLP_HTTP_ENDPOINT": f"127.0.0.1:{self.port}",
            "OTELCOL_OTLP_GRPC_ENDPOINT": f"127.0.0.1:{self.grpc_port}",
            "OTELCOL_TELEMETRY_PORT": str(self.telemetry_port),
            **(env or {}),
        }

    def argv(self) -> list[str]:
        return [str(self.binary), *(f"--config={config}" for config in self.configs)]

    def _ready(self) -> bool:
        # The Collector starts its receivers last, once exporters and processors run: a receiver that
        # accepts connections means the whole pipeline is up. Every shipped config has the gRPC one.
        assert self._process is not None
        if self._process.poll() is not None:
            raise RuntimeError(f"exited with code {self._process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", self.grpc_port), timeout=1).close()
            return True
        except OSError:
            return False

    def validate(self) -> subprocess.CompletedProcess[str]:
        """``otelcol validate`` of the same configs with the same environment (exit status 0: valid)."""
        return subprocess.run(
            [str(self.binary), "validate", *self.argv()[1:]],
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )


S = TypeVar("S", bound=_Server)


@contextmanager
def _running(server: S) -> Iterator[S]:
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def victoria_metrics(
    tmp_dir: Path | str, *, port: int | None = None, extra_args: Sequence[str] = ()
) -> Iterator[VictoriaMetrics]:
    """A running VictoriaMetrics with its data in ``tmp_dir``; stopped on exit."""
    server = VictoriaMetrics(backend_binaries().victoria_metrics, Path(tmp_dir), port, extra_args)
    with _running(server):
        yield server


def _write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@contextmanager
def prometheus(
    config: str | Path,
    tmp_dir: Path | str,
    *,
    rule_files: Sequence[str | Path] = (),
    port: int | None = None,
    extra_args: Sequence[str] = (),
) -> Iterator[Prometheus]:
    """A running Prometheus with its data in ``tmp_dir``; stopped on exit.

    ``config`` and each of ``rule_files``: a ``Path`` is a file, a ``str`` is
    YAML text written into ``tmp_dir``. Rule files are appended to the config
    as a ``rule_files:`` section (so the config must not have one).
    """
    tmp = Path(tmp_dir)
    tmp.mkdir(parents=True, exist_ok=True)
    if isinstance(config, Path) and not rule_files:
        # Used in place: relative paths inside it (rule files) resolve against
        # its own folder, and editing it + reload() works as users expect.
        config_file = config.resolve()
    else:
        config_text = config.read_text() if isinstance(config, Path) else config
        if not config_text.strip():
            # An empty config skips Prometheus' defaults (it even sets GOGC=0).
            config_text = "global: {}\n"
        rule_paths = [
            rule.resolve() if isinstance(rule, Path) else _write_text(tmp / f"rules_{i}.yml", rule)
            for i, rule in enumerate(rule_files)
        ]
        if rule_paths:
            if "rule_files:" in config_text:
                raise ValueError("pass rule files either in the config or as rule_files=, not both")
            config_text += "\nrule_files:\n" + "".join(f"  - {json.dumps(str(p))}\n" for p in rule_paths)
        # Note: relative paths inside a copied config resolve against tmp_dir.
        config_file = _write_text(tmp / "prometheus.yml", config_text)
    server = Prometheus(backend_binaries().prometheus, tmp, config_file, port, extra_args)
    with _running(server):
        yield server


@contextmanager
def otel_collector(
    tmp_dir: Path | str,
    configs: Sequence[Path] = (STORE_COLLECTOR_CONFIG,),
    *,
    env: Mapping[str, str] | None = None,
    name: str = "otelcol",
) -> Iterator[Collector]:
    """A running Collector with ``configs`` (merged in order) and ``env``; stopped on exit."""
    with _running(Collector(collector_binary(), Path(tmp_dir), configs, env, name)) as server:
        yield server


def store_prometheus_config(store_url: str, *, interval: str | None = None) -> str:
    """collector/prometheus-store.yml for a store at ``store_url``, with absolute rule paths.

    ``interval`` replaces the scrape and evaluation intervals (tests use short ones).
    """
    text = STORE_PROMETHEUS_CONFIG.read_text()
    replacements = {
        STORE_DEFAULT_ADDRESS: urllib.parse.urlparse(store_url).netloc,
        "- rules/*.rules.yml": f"- {COLLECTOR_DIR / 'rules'}/*.rules.yml",
    }
    if interval is not None:
        replacements |= {
            "scrape_interval: 15s": f"scrape_interval: {interval}",
            "evaluation_interval: 15s": f"evaluation_interval: {interval}",
        }
    for old, new in replacements.items():
        if text.count(old) != 1:
            raise ValueError(f"{STORE_PROMETHEUS_CONFIG} no longer has exactly one {old!r}")
        text = text.replace(old, new)
    return text


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run the whole chain on loopback until Ctrl-C: OpenTelemetry Collector "
        f"({STORE_COLLECTOR_CONFIG.relative_to(REPO_ROOT)}) -> VictoriaMetrics -> Prometheus "
        f"({STORE_PROMETHEUS_CONFIG.relative_to(REPO_ROOT)}, federating VictoriaMetrics, with the rules)."
    )
    parser.add_argument("--vm-port", type=int, default=0, help="VictoriaMetrics port (default: a free one)")
    parser.add_argument("--prometheus-port", type=int, default=0, help="Prometheus port (default: a free one)")
    parser.add_argument("--interval", default="15s", help="Prometheus scrape and rule evaluation interval (15s)")
    parser.add_argument("--data-dir", type=Path, help="keep data and logs here (default: a temp dir, deleted)")
    args = parser.parse_args(argv)

    # SIGTERM (e.g. from a process manager) takes the same clean path as Ctrl-C.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    # Also when started in the background by a shell, which would ignore SIGINT.
    signal.signal(signal.SIGINT, _raise_keyboard_interrupt)
    with tempfile.TemporaryDirectory(prefix="tolaria-stack-") as scratch:
        base = args.data_dir or Path(scratch)
        try:
            # Started store first, Prometheus last: each finds what it sends to or reads from already up.
            with (
                victoria_metrics(base / "vm", port=args.vm_port or None) as vm,
                otel_collector(base / "otelcol", env={"OTELCOL_STORE_OTLP_ENDPOINT": vm.otlp_metrics_url}) as collector,
                prometheus(
                    store_prometheus_config(vm.url, interval=args.interval),
                    base / "prometheus",
                    port=args.prometheus_port or None,
                ) as prom,
            ):
                servers = (collector, vm, prom)
                print(
                    f"OpenTelemetry Collector: OTLP/HTTP {collector.otlp_endpoints['http/protobuf']}, "
                    f"OTLP/gRPC {collector.otlp_endpoints['grpc']}   (log: {collector.log_path})"
                )
                print(f"VictoriaMetrics:         {vm.url}   (vmui: {vm.url}/vmui, log: {vm.log_path})")
                print(
                    f"Prometheus:              {prom.url}   (rules and alerts: {prom.url}/alerts, log: {prom.log_path})"
                )
                print("Point a trainer at the Collector with (a plain loop also calls configure_meter_provider()):")
                print("  export TOLARIA_SEED_LAYER_SUMMARIES_ENABLED=true")
                print(f"  export OTEL_EXPORTER_OTLP_ENDPOINT={collector.otlp_endpoints['http/protobuf']}")
                print(f"or try it: tolaria-otel demo --otlp-endpoint {collector.otlp_endpoints['http/protobuf']}")
                print("Ctrl-C to stop.", flush=True)
                # Supervise: leave if a server dies, not only on Ctrl-C.
                while all(server.running for server in servers):
                    time.sleep(0.5)
                dead = next(server for server in servers if not server.running)
                print(f"{dead.name} exited unexpectedly:\n{dead.log_tail()}", file=sys.stderr)
                return 1
        except KeyboardInterrupt:
            print("\nstopped.")
            return 0


if __name__ == "__main__":
    sys.exit(main())
