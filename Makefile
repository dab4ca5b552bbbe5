# Two entry points set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install --quiet --constraint constraints.txt

.PHONY: demo test test-fast install backends clean stack

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) -e '.[test]'
	touch $@

install: $(VENV)/.installed

# The second venv: the package at the oldest OpenTelemetry versions pyproject.toml declares, for the tests
# that exercise the SDK and the exporters (.venv keeps the newest). No pip of its own: .venv's installs into it.
OLDEST := .venv-otel-oldest
# OLDEST_TESTS: the versions and the private parts, the provider and views, the SDK's state (release,
# histogram buckets), OTLP export, the exporters' log redaction and pull mode (about 1 minute).
OLDEST_TESTS := tests/test_otel_versions.py tests/test_provider.py tests/test_cardinality.py tests/test_seed_churn.py \
	tests/test_diagnostics.py tests/test_otlp_export.py tests/test_secrets.py tests/test_pull_mode.py

$(OLDEST)/.installed: $(VENV)/.installed pyproject.toml constraints-otel-oldest.txt
	rm -rf $(OLDEST)
	$(PYTHON) -m venv --without-pip $(OLDEST)
	$(BIN)/pip --python $(OLDEST)/bin/python install --quiet --constraint constraints-otel-oldest.txt \
		-e '.[grpc,prometheus]' pytest pytest-timeout
	touch $@

demo: install
	$(BIN)/tolaria-otel demo

# Real Prometheus, promtool and VictoriaMetrics from Debian 13 packages, into .cache/backends, and an
# OpenTelemetry Collector built from Debian's Go packages, into .cache/otelcol (both git-ignored; the
# Collector is rebuilt only when the packages it was built from change). Headless Chromium, which opens
# the HTML report in tests/test_report.py: Debian's chromium package, installed with apt-get when missing.
backends:
	bash devtools/fetch_backends.sh
	bash devtools/otelcol/build.sh
	bash devtools/fetch_chromium.sh

# The whole chain on loopback until Ctrl-C: Collector -> VictoriaMetrics -> Prometheus with Nissa's rules.
stack: install backends
	$(BIN)/python -m devtools.stack

# The suite includes tests/test_wheel.py: it builds the sdist and wheel and installs the wheel into fresh
# venvs under pytest's tmp folder (core, each extra, the oldest declared Python), pinned by constraints.txt.
# Lint, format and types first (seconds; configured in pyproject.toml), then the whole suite on the newest
# OpenTelemetry, then OLDEST_TESTS on the oldest.
test: install backends $(OLDEST)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m pytest
	$(OLDEST)/bin/python -m pytest $(OLDEST_TESTS)

# The quick loop: every test that needs no backend, no spawned ranks and no wheel build and is not marked slow
# (tests/conftest.py), one worker per core (a module's tests stay on one worker: they share its fixtures).
test-fast: install
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not backend and not distributed and not packaging and not slow"

# Grafana dashboards: regenerate dashboards/json/ from dashboards/*.py (commit the result).
.PHONY: dashboards
dashboards: install
	$(BIN)/python -m dashboards.generate

# Overhead benchmarks (docs/benchmarks.md). The peers (lightning, wandb, tensorboard) go into .venv only here.
.PHONY: bench bench-gpu
bench: install
	$(PIP) -r benchmarks/requirements.txt
	$(BIN)/python -m benchmarks.overhead

# On a CUDA machine, with its own CUDA torch (the venv pins the CPU wheel): python -m benchmarks.gpu.
bench-gpu:
	PYTHONPATH=src$${PYTHONPATH:+:$$PYTHONPATH} PYTHONUNBUFFERED=1 $(PYTHON) -m benchmarks.gpu

clean:
	rm -rf $(VENV) $(OLDEST) .cache .pytest_cache
