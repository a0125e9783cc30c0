# The two commands: `make run` (the whole pipeline) and `make test` (the test suite).
# Both create .venv from the pinned requirements when it is missing or out of date.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 MLFLOW_DISABLE_TELEMETRY=true \
       PREFECT_SERVER_ANALYTICS_ENABLED=false DVC_NO_ANALYTICS=1 DO_NOT_TRACK=1 \
       PREFECT_HOME=$(CURDIR)/.prefect

.PHONY: run test bench mlflow-ui prefect-ui serve venv clean

venv: $(STAMP)

# torch==2.13.0 is pinned first so pip takes the CPU wheel on a CPU machine (an open range pulls CUDA builds)
$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/instructflow run $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

bench: $(STAMP)
	$(BIN)/python bench/pipeline.py $(ARGS)

serve: $(STAMP)
	$(BIN)/instructflow serve

mlflow-ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000

prefect-ui: $(STAMP)
	$(BIN)/prefect server start --host 127.0.0.1 --port 4200

clean:
	rm -rf .prefect mlflow.db mlartifacts checkpoints data/prepared artifacts metrics plots reports registry
