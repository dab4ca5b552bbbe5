"""How long closing the telemetry and shutting the provider down take when the collector is in trouble.

Run: ``python -m benchmarks.teardown``. Each case is a fresh process with one trained epoch to export:
the collector's address refuses connections, or accepts them and never answers (hung), with the SDK's
default OTLP timeout (10 s) and with the recommended ``OTEL_EXPORTER_OTLP_TIMEOUT=2``.
``SeedLayerTelemetry.close()`` does no I/O; ``MeterProvider.shutdown()`` makes the final export, bounded
by the exporter's timeout (docs/operations.md).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

#: (collector, OTEL_EXPORTER_OTLP_TIMEOUT, export_each_epoch): the first four time shutdown's own final export
#: (the epoch's export off, so that it is the only one); the last two the default, whose epoch export is
#: already under way when the provider shuts down.
CASES = [
    ("refused", None, False),
    ("refused", "2", False),
    ("hung", None, False),
    ("hung", "2", False),
    ("refused", None, True),
    ("refused", "2", True),
    ("hung", None, True),
    ("hung", "2", True),
]


def teardown_times(mode: str, timeout: str | None, each_epoch: bool = False) -> dict[str, float]:
    """In this process: train one epoch, then time close() and provider.shutdown()."""
    import torch

    from tolaria_otel import SeedLayerSettings, SeedLayerTelemetry, configure_meter_provider

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    port = server.getsockname()[1]
    if mode == "hung":
        server.listen(16)  # the kernel completes the handshakes; nobody ever reads or answers
    else:
        server.close()
    os.environ.update(
        {
            "OTEL_METRICS_EXPORTER": "otlp",
            "OTEL_METRIC_EXPORT_INTERVAL": "600000",
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": f"http://127.0.0.1:{port}/v1/metrics",
        }
    )
    if timeout is not None:
        os.environ["OTEL_EXPORTER_OTLP_TIMEOUT"] = timeout
    settings = SeedLayerSettings(enabled=True)
    provider = configure_meter_provider(settings)
    seed = torch.nn.Linear(4, 4)
    telemetry = SeedLayerTelemetry(
        seed,
        {"s": (seed, "SEED_STAGE_TRAINING")},
        settings=settings,
        meter_provider=provider,
        export_each_epoch=each_epoch,
    )
    seed(torch.ones(1, 4)).sum().backward()
    telemetry.observe_step()
    telemetry.end_epoch()
    start = time.perf_counter()
    telemetry.close()
    closed = time.perf_counter()
    provider.shutdown()
    shut = time.perf_counter()
    server.close()
    return {"close_s": closed - start, "shutdown_s": shut - closed}


def measure(mode: str, timeout: str | None, each_epoch: bool = False) -> dict[str, float]:
    """One case in a fresh interpreter (the SDK's exporters keep process-wide state)."""
    code = (
        "import json; from benchmarks.teardown import teardown_times; "
        f"print(json.dumps(teardown_times({mode!r}, {timeout!r}, {each_epoch!r})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
        env={k: v for k, v in os.environ.items() if not k.startswith("OTEL_")},
    )
    return json.loads(out.stdout.splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="python -m benchmarks.teardown", description=__doc__.split("\n\n")[0]).parse_args(argv)
    with ThreadPoolExecutor(len(CASES)) as pool:
        results = list(pool.map(lambda case: measure(*case), CASES))
    print(
        "| collector | OTEL_EXPORTER_OTLP_TIMEOUT | export_each_epoch | close() s | provider.shutdown() s |\n"
        "| --- | --- | --- | ---: | ---: |"
    )
    for (mode, timeout, each), result in zip(CASES, results):
        print(f"| {mode} | {timeout or 'unset (10)'} | {each} | {result['close_s']:.3f} | {result['shutdown_s']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
