"""What importing the package costs on top of torch, and what ``tolaria-otel --help`` costs.

Run: ``python -m benchmarks.imports``. Each measurement is a fresh interpreter; the commands are
interleaved round by round, and the table gives the median wall time of each and the difference to
``import torch`` alone.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "python (nothing)": "pass",
    "import torch": "import torch",
    "import torch, tolaria_otel and its public API": (
        "import torch; from tolaria_otel import SeedLayerTelemetry, configure_meter_provider, SeedLayerSettings"
    ),
    "import tolaria_otel (bare)": "import tolaria_otel",
    "tolaria-otel --help": "import sys; from tolaria_otel.cli import main; sys.argv = ['tolaria-otel', '--help']; "
    "import contextlib, io\nwith contextlib.redirect_stdout(io.StringIO()):\n"
    "    try: main(['--help'])\n    except SystemExit: pass",
}


def _time(code: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return time.perf_counter() - start


#: Imported after torch, timed inside the interpreter (free of start-up noise).
AFTER_TORCH = {
    "SeedLayerTelemetry": "from tolaria_otel import SeedLayerTelemetry",
    "the public API": "from tolaria_otel import SeedLayerTelemetry, configure_meter_provider, SeedLayerSettings",
}


def _time_after_torch(statement: str) -> float:
    code = f"import time, torch\nstart = time.perf_counter()\n{statement}\nprint(time.perf_counter() - start)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return float(out.stdout.split()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.imports", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.rounds):
        for name, code in COMMANDS.items():
            times[name].append(_time(code))
    torch_alone = statistics.median(times["import torch"])
    print(f"| command ({args.rounds} fresh interpreters each, interleaved) | median s | vs import torch |")
    print("| --- | ---: | ---: |")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"| {name} | {median:.3f} | {median - torch_alone:+.3f} |")
    print("\n| after `import torch`, in the same interpreter | median s |\n| --- | ---: |")
    for name, statement in AFTER_TORCH.items():
        print(f"| {name} | {statistics.median(_time_after_torch(statement) for _ in range(args.rounds)):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
