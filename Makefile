# ae-repr: `make demo` runs the main job on digits; `make test` runs the tests; `make lint` checks style and
# the import layers. Each sets up first.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
OUT ?= runs/demo

export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120

.PHONY: install demo test test-scenarios lint bench bench-quick bench-anchor peer-venv services services-stop clean browser

install: $(VENV)/.installed

# Re-installs only when pyproject.toml changes. torch is pinned here: an open range pulls a CUDA build.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: install
	$(BIN)/ae-repr run --out $(OUT)

# the MLflow UI test drives a headless browser: `browser` installs Debian's chromium when it is missing.
# Two pytest processes side by side, each with its own background set-ups (tests/background.py): the in-process
# tests run one at a time, so one process left a core idle for half the run. TEST_SIDE's output follows the rest's.
TEST_SIDE := tests/flows
test: install browser
	@side=$$(mktemp); trap 'kill $$pid 2>/dev/null; rm -f $$side' EXIT; \
	$(PY) -m pytest -q -m "not scenario" $(TEST_SIDE) > $$side 2>&1 & pid=$$!; \
	$(PY) -m pytest -q -m "not scenario" tests $(TEST_SIDE:%=--ignore=%); rest=$$?; \
	wait $$pid; code=$$?; echo "--- $(TEST_SIDE)"; cat $$side; exit $$(( rest || code ))

# scenarios too heavy for `make test`'s budget (several runs at once, kills mid-run, a Ray cluster); CI runs both
test-scenarios: install
	$(PY) -m pytest -q -m scenario

# ruff, then the import contracts in pyproject.toml ([tool.importlinter]): the layers hold
lint: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports --no-cache

# Benchmarks (benchmarks/RESULTS.md). OpenMP threads sleep instead of spinning while they wait: on a shared
# 2-core machine spinning threads collapsed training throughput 10-20x (measured), burying every ratio in noise.
BENCH_ENV := OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE}
PEER_VENV := benchmarks/.peer-venv

bench-quick: install
	$(BENCH_ENV) $(PY) benchmarks/run_all.py --quick

# pythae lives in its own venv, never in the project's; torch is pinned first (an open range pulls CUDA).
peer-venv: $(PEER_VENV)/.installed

$(PEER_VENV)/.installed: benchmarks/requirements-peers.txt
	test -x $(PEER_VENV)/bin/python || $(PYTHON) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/python -m pip install -q torch==2.13.0
	$(PEER_VENV)/bin/python -m pip install -q -r benchmarks/requirements-peers.txt
	touch $@

bench: install peer-venv
	$(BENCH_ENV) $(PY) benchmarks/run_all.py --json benchmarks/results.json

# the default `ae-repr run` against the hand-written pipeline alone (part of `make bench`): a warm-up and two timed runs of each side
bench-anchor: install
	$(BENCH_ENV) $(PY) benchmarks/run_all.py --only vs_handwritten

# Headless Chromium for the MLflow UI test (Debian's package; idempotent).
browser:
	test -x /usr/bin/chromium || { SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); $$SUDO apt-get update -qq && \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

# Real mode: Prefect server, MLflow server and a local-cpu process worker on 127.0.0.1, PIDs and data
# under .services/ (ports: PREFECT_PORT / MLFLOW_PORT, default 4200 / 5000 or free ones).
services: install
	$(PY) scripts/services.py start $(if $(PREFECT_PORT),--prefect-port $(PREFECT_PORT)) $(if $(MLFLOW_PORT),--mlflow-port $(MLFLOW_PORT))

# Stops exactly the process groups `make services` recorded.
services-stop:
	$(PY) scripts/services.py stop

clean:
	rm -rf runs .pytest_cache .ruff_cache
