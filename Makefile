# ae-repr: `make demo` runs the main job on digits; `make test` runs the tests. Both set up first.
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

.PHONY: install demo test lint bench bench-quick services services-stop clean browser

install: $(VENV)/.installed

# Re-installs only when pyproject.toml changes. torch is pinned here: an open range pulls a CUDA build.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: install
	$(BIN)/ae-repr run --out $(OUT)

test: install
	$(PY) -m pytest -q

lint: install
	$(BIN)/ruff check .

bench-quick: install
	$(PY) benchmarks/trainer_vs_bare.py --quick

bench: install
	$(PY) benchmarks/trainer_vs_bare.py

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
