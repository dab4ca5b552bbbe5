"""The suite's markers, so a quick loop can leave out what needs more than this process.

``make test`` runs everything (the README's test command and CI's); ``make test-fast`` runs what needs no
backend, no spawned ranks and no wheel build, less the ones marked slow (the benchmarks' scripts, teardown
timeouts, the CLI fuzzer, torch.compile, the secrets sweep), to stay a quick loop. A test module that needs one
of them says so with ``pytestmark = pytest.mark.backend`` (or ``distributed``, ``packaging``, ``slow``); a
single test, with the decorator.
"""

from __future__ import annotations

import pytest

MARKERS = {
    "backend": "starts a real backend built by `make backends` (Collector, Prometheus, VictoriaMetrics, promtool)",
    "distributed": "spawns torch.distributed ranks (gloo)",
    "packaging": "builds the sdist and wheel and installs them into fresh virtual environments",
    "slow": "runs the package's scripts, or waits out timeouts, in fresh processes (seconds each)",
}


def pytest_configure(config: pytest.Config) -> None:
    for name, description in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {description}")
