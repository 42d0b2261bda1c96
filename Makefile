# Two commands: `make run` (set up + run the service on embedded defaults) and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
BORA_DATA_DIR ?= ./data
# `make run` serves the demo model shipped in the repository (trained on synthetic clips; not a medical model).
BORA_MODEL_PRESET ?= demo
BORA_MODEL_DIR ?= demo/weights/bora-demo
TINY_DIR ?= $(BORA_DATA_DIR)/models/tiny
# The embedded default listens on loopback only, so it may turn auth off; production keeps BORA_AUTH=required.
BORA_AUTH ?= disabled

.PHONY: install run test tiny lint bench demo-model

$(BIN)/bora: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(BIN)/bora

tiny: install
	@test -f $(TINY_DIR)/model_index.json || $(BIN)/bora make-tiny $(TINY_DIR)

# OMP_WAIT_POLICY=PASSIVE: on a busy CPU, OpenMP threads that spin while waiting made torch ~10× slower.
run: install
	BORA_DATA_DIR=$(BORA_DATA_DIR) BORA_MODEL_PRESET=$(BORA_MODEL_PRESET) BORA_MODEL_DIR=$(BORA_MODEL_DIR) \
		BORA_AUTH=$(BORA_AUTH) OMP_WAIT_POLICY=PASSIVE $(BIN)/bora serve

# Retrain the shipped demo model from nothing (seeded; about half an hour on 2 quiet CPU cores).
demo-model: install
	OMP_WAIT_POLICY=PASSIVE $(BIN)/bora build-demo --out demo/weights/bora-demo --work $(BORA_DATA_DIR)/demo-build \
		2> demo/weights/training.log

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check model service worker tests bench demo
	$(BIN)/mypy service worker

bench: tiny
	$(BIN)/python bench/stdit_speed.py
	$(BIN)/python bench/service_submit.py
	$(BIN)/python bench/worker_pickup.py
	$(BIN)/python bench/mp4_encode.py
