# Two commands: `make run` (set up + run the service on embedded defaults) and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
BORA_DATA_DIR ?= ./data
BORA_MODEL_DIR ?= $(BORA_DATA_DIR)/models/tiny
# The embedded default listens on loopback only, so it may turn auth off; production keeps BORA_AUTH=required.
BORA_AUTH ?= disabled

.PHONY: install run test chaos tiny lint bench

$(BIN)/bora: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(BIN)/bora

tiny: install
	@test -f $(BORA_MODEL_DIR)/model_index.json || $(BIN)/bora make-tiny $(BORA_MODEL_DIR)

run: tiny
	BORA_DATA_DIR=$(BORA_DATA_DIR) BORA_MODEL_DIR=$(BORA_MODEL_DIR) BORA_AUTH=$(BORA_AUTH) $(BIN)/bora serve

test: install
	$(BIN)/python -m pytest -q -m "not chaos"

# The bounded chaos run (faults, kill -9, a zombie worker; a few minutes on 2 cores): its own CI stage.
chaos: install
	$(BIN)/python -m pytest -q -m chaos tests/faults/test_chaos.py

lint: install
	$(BIN)/ruff check model service worker tests bench
	$(BIN)/mypy service worker

bench: tiny
	$(BIN)/python bench/stdit_speed.py
	$(BIN)/python bench/service_submit.py
	$(BIN)/python bench/worker_pickup.py
	$(BIN)/python bench/mp4_encode.py
