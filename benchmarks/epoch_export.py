"""What exporting each epoch costs the training loop: an OTLP/HTTP export started off the training thread at
each epoch end (the default) against exports left to a 60 s interval (``export_each_epoch=False``).

Run: ``python -m benchmarks.epoch_export``. A small seeded network (4 seeds) trains epochs of ``--steps``
optimizer steps on the CPU, exporting over the real OTLP/HTTP exporter to an in-process HTTP sink on loopback
that answers 200 to each request, in a process of its own (the exporter's work is in the measured process: the
collection, the serialisation and the request).
The two variants alternate ``--repeats`` times; the medians and their ratio are printed: the whole run's time
per epoch, and the time ``end_epoch()`` takes on the training thread.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

#: The sink: a threading HTTP server answering 200 to every POST, printing its port.
_SINK = """
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class Sink(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
server = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


def run(url: str, export_each_epoch: bool, epochs: int, steps: int) -> tuple[float, float, int]:
    """(seconds per epoch, median end_epoch() seconds, exports made) for one run."""
    import torch

    from tolaria_otel import SeedLayerSettings, SeedLayerTelemetry, configure_meter_provider
    from tolaria_otel.demo.seeded_mlp import SeededMLP, SeedRegistry

    os.environ.update(
        {
            "OTEL_METRICS_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": url,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_METRIC_EXPORT_INTERVAL": "60000",
        }
    )
    settings = SeedLayerSettings(enabled=True)
    provider = configure_meter_provider(settings)
    torch.manual_seed(0)
    model, registry = SeededMLP(), SeedRegistry()
    for i in range(4):
        registry.add(f"seed-{i}", model.graft(f"seed_{i}"), "TRAINING")
    telemetry = SeedLayerTelemetry(
        model, registry, settings=settings, meter_provider=provider, export_each_epoch=export_each_epoch
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    telemetry.attach(optimizer)
    x, y = torch.randn(32, 32), torch.randn(32, 10)
    ends = []
    start = time.perf_counter()
    for _ in range(epochs):
        for _ in range(steps):
            torch.nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
        began = time.perf_counter()
        telemetry.end_epoch()
        ends.append(time.perf_counter() - began)
    elapsed = time.perf_counter() - start
    instruments = telemetry._instruments
    exports = instruments._shared.epoch_export.exports if instruments is not None else 0
    telemetry.close()
    provider.shutdown()
    return elapsed / epochs, statistics.median(ends), exports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.epoch_export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per epoch")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    results: dict[bool, list[tuple[float, float, int]]] = {True: [], False: []}
    sink = subprocess.Popen([sys.executable, "-c", _SINK], stdout=subprocess.PIPE, text=True)
    try:
        assert sink.stdout is not None
        url = f"http://127.0.0.1:{int(sink.stdout.readline())}/v1/metrics"
        run(url, True, 3, 2)  # warm-up: imports, the exporter's first connection
        for _ in range(args.repeats):
            for each in (False, True):
                results[each].append(run(url, each, args.epochs, args.steps))
    finally:
        sink.terminate()
        sink.wait(10)
    print(
        f"{args.epochs} epochs of {args.steps} steps, 4 seeds, OTLP/HTTP to a loopback sink, {args.repeats} runs each"
    )
    print("| exports | epoch ms | end_epoch() ms | exports per run |\n| --- | ---: | ---: | ---: |")
    medians = {}
    for each, label in ((False, "interval only (60 s)"), (True, "each epoch (default)")):
        epoch = statistics.median(r[0] for r in results[each]) * 1e3
        end = statistics.median(r[1] for r in results[each]) * 1e3
        exports = statistics.median(r[2] for r in results[each])
        medians[each] = (epoch, end)
        print(f"| {label} | {epoch:.2f} | {end:.3f} | {exports:.0f} |")
    print(
        f"ratio each epoch / interval only: epoch {medians[True][0] / medians[False][0]:.3f}, "
        f"end_epoch() {medians[True][1] / medians[False][1]:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
