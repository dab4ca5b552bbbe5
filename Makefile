# Two entry points set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install --quiet --constraint constraints.txt

.PHONY: demo test install backends clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/python examples/minimal.py

# Real Prometheus, promtool and VictoriaMetrics from Debian 13 packages, into .cache/backends (git-ignored).
backends:
	bash devtools/fetch_backends.sh

test: install backends
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) .cache .pytest_cache
