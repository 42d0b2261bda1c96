# Two commands: `make run` (set up + run the service on embedded defaults) and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# checkov (security scan of deploy/k8s in tests/deploy) pins old boto3/networkx/packaging: a venv of its own.
CHECKOV := build/tools/checkov/bin/checkov
BORA_DATA_DIR ?= ./data
# `make run` serves the demo model shipped in the repository (trained on synthetic clips; not a medical model).
BORA_MODEL_PRESET ?= demo
BORA_MODEL_DIR ?= demo/weights/bora-demo
TINY_DIR ?= $(BORA_DATA_DIR)/models/tiny
# The embedded default listens on loopback only, so it may turn auth off; production keeps BORA_AUTH=required.
BORA_AUTH ?= disabled

.PHONY: install run test test-slow test-kernels chaos test-images tiny lint bench demo-model

$(BIN)/bora: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(BIN)/bora

$(CHECKOV):
	$(PYTHON) -m venv build/tools/checkov
	build/tools/checkov/bin/pip install -q checkov==3.3.30

tiny: install
	@test -f $(TINY_DIR)/model_index.json || $(BIN)/bora make-tiny $(TINY_DIR)

# OMP_WAIT_POLICY=PASSIVE: on a busy CPU, OpenMP threads that spin while waiting made torch ~10× slower.
run: install
	BORA_DATA_DIR=$(BORA_DATA_DIR) BORA_MODEL_PRESET=$(BORA_MODEL_PRESET) BORA_MODEL_DIR=$(BORA_MODEL_DIR) \
		BORA_AUTH=$(BORA_AUTH) OMP_WAIT_POLICY=PASSIVE $(BIN)/bora serve

# Retrain the shipped demo model from nothing (seeded; 49 min on 2 cores: README, Demo model). It runs alone, so
# OpenMP's default spin-wait stays on: with PASSIVE a training step took 0.61 s instead of 0.48 (57 min in all),
# the thousands of small ops per step each waking sleeping threads; the weights are the same bit for bit.
demo-model: install
	$(BIN)/bora build-demo --out demo/weights/bora-demo --work $(BORA_DATA_DIR)/demo-build \
		2> demo/weights/training.log

# Everything but the stages below (pyproject's addopts leave out the `slow`, `chaos` and `images` markers).
test: install $(CHECKOV)
	$(BIN)/python -m pytest -q

# Minutes-long tests: the client and playground against a whole stack, long sampler and memory runs.
test-slow: install
	$(BIN)/python -m pytest -q -m "slow and not chaos"

# The bounded chaos run (faults, kill -9, a zombie worker; a few minutes on 2 cores): its own CI stage.
chaos: install
	$(BIN)/python -m pytest -q -m chaos tests/faults/test_chaos.py

# The reference vectors were made on another CPU: rerun their comparisons on torch's AVX2 and portable kernels.
test-kernels: install
	for cap in avx2 default; do \
	  echo "== reference tests with ATEN_CPU_CAPABILITY=$$cap"; \
	  ATEN_CPU_CAPABILITY=$$cap $(BIN)/python -m pytest -q -m reference tests/model || exit 1; \
	done

# Images built and the compose stack run in containers (podman; CI runs it as a stage of its own). Makes the
# stand-in base images once (cached), builds and removes ~1 GB of images per run. tests/deploy/images/.
test-images: install
	PYTHON=$(PYTHON) VENV=$(VENV) bash tests/deploy/images/prepare.sh
	$(BIN)/python -m pytest -q -s -m images tests/deploy/test_deploy_containers.py

lint: install
	$(BIN)/ruff check model service worker bora_client demo tests bench
	$(BIN)/mypy service worker bora_client

bench: tiny
	$(BIN)/python bench/stdit_speed.py
	$(BIN)/python bench/service_submit.py
	$(BIN)/python bench/worker_pickup.py
	$(BIN)/python bench/worker_batching.py
	$(BIN)/python bench/mp4_encode.py
