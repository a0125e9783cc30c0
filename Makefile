# The two commands: `make run` (the whole pipeline) and `make test` (the test suite).
# Both create .venv from the pinned requirements when it is missing or out of date; `make test` first installs
# the system packages its tests need (infra/system-packages.sh: Chromium and chromedriver for the page,
# PostgreSQL's server for the server tests; only what is missing).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

# The environment every entry point also sets for itself (instructflow/env.py): offline, no telemetry, the
# project's own Prefect home and MLflow store. One export per line: `export A=1 B=2` would define only A.
# `make env` prints what these targets pass on (a test reads it back).
export HF_HUB_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export HF_HUB_DISABLE_PROGRESS_BARS := 1
export TRANSFORMERS_VERBOSITY := error
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DVC_NO_ANALYTICS := 1
export DO_NOT_TRACK := 1
export PREFECT_HOME ?= $(CURDIR)/.prefect
export MLFLOW_TRACKING_URI ?= sqlite:///$(CURDIR)/mlflow.db

.PHONY: run test bench mlflow-ui prefect-ui serve venv system-packages clean env

venv: $(STAMP)

# torch==2.13.0 is pinned first so pip takes the CPU wheel on a CPU machine (an open range pulls CUDA builds)
$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -r requirements.lock
	PYTHONWARNINGS=ignore $(BIN)/python -m pip install -q --no-deps -e .  # (setuptools warns about editable installs)
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/instructflow run $(ARGS)

# Chromium and chromedriver (tests/test_label.py) and PostgreSQL (tests/servers.py) from Debian's packages
# (installs only what is missing; sudo when not root)
system-packages:
	sh infra/system-packages.sh

test: system-packages $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

bench: $(STAMP)
	$(BIN)/python bench/pipeline.py $(ARGS)

serve: $(STAMP)
	$(BIN)/instructflow serve

mlflow-ui: $(STAMP)
	exec env MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow ui --backend-store-uri $(MLFLOW_TRACKING_URI) --host 127.0.0.1 --port 5000

prefect-ui: $(STAMP)
	$(BIN)/prefect server start --host 127.0.0.1 --port 4200

env:
	@$(PYTHON) -m instructflow.env

clean:
	rm -rf .prefect mlflow.db mlartifacts checkpoints data/prepared artifacts metrics plots reports registry lineage dvc_plots
