# hybridmesh: `make demo` and `make test` set up everything they need, idempotently.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON_BOOT ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
BUF := node_modules/.bin/buf
STAMPS := .stamps
DATASET := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || command -v sudo >/dev/null && [ "$$(id -u)" != 0 ] && echo sudo)
PYTEST_ARGS ?=

.PHONY: help setup demo bench up down test lint protos models clean k8s-smoke image

help:
	@echo "make demo   - set up, then run hybridmesh on the embedded local mesh"
	@echo "make bench  - set up, then benchmarks and faults under load (~10 min)"
	@echo "make test   - set up, then lint (buf, ruff, mypy --strict) and run the test suite"
	@echo "make protos - regenerate Python code from protos/"
	@echo "make k8s-smoke - run the edge and cloud overlays with podman kube play (~30 s cached, first ~3 min)"
	@echo "make image - build the edge, cloud and registry images with docker or podman (offline)"
	@echo "make models - retrain the Fashion-MNIST models into a new store version (minutes)"

$(STAMPS):
	@mkdir -p $@

# The virtualenv is rebuilt when the pins change.
$(STAMPS)/venv: requirements.lock pyproject.toml | $(STAMPS)
	@test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation \
		--config-settings editable_mode=compat -e .
	@touch $@

$(STAMPS)/buf: package.json package-lock.json | $(STAMPS)
	npm install --no-audit --no-fund --loglevel=error
	@touch $@

$(DATASET):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq dataset-fashion-mnist

setup: $(STAMPS)/venv $(STAMPS)/buf $(DATASET)

# torch lives in its own venv: training only, never imported by a service.
$(STAMPS)/venv-train: requirements-train.txt requirements.lock | $(STAMPS)
	@test -x .venv-train/bin/python || $(PYTHON_BOOT) -m venv .venv-train
	.venv-train/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-train.txt
	@touch $@

MODEL_VERSION ?= 1
# The edge fold models (out-of-fold router training data, workload/folds.py): 3 epochs, not
# the edge's 12, so that 5 folds fit in ~25 min on 2 loaded cores (models/folds/*/MODEL_CARD.md).
FOLDS ?= 5
FOLD_EPOCHS ?= 3
models: $(STAMPS)/venv-train $(DATASET)
	PYTHONPATH=. .venv-train/bin/python -m workload.train_fashion --model edge --version $(MODEL_VERSION)
	PYTHONPATH=. .venv-train/bin/python -m workload.train_fashion --model cloud --version $(MODEL_VERSION)
	PYTHONPATH=. .venv-train/bin/python -m workload.train_edge_folds --folds $(FOLDS) \
		--epochs $(FOLD_EPOCHS) --version $(MODEL_VERSION)

protos: $(STAMPS)/venv
	$(PY) tools/generate_protos.py

lint: setup
	$(BUF) lint
	BUF=$(BUF) tools/buf_breaking.sh
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy .

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

# The k8s manifests as committed, run with podman (tools/k8s_smoke.py): renders both
# overlays, builds the image offline on a cached debootstrap base, plays the edge site and
# the cloud tier, checks them, tears down. Not in `make test` (see README, Deploying).
k8s-smoke: $(STAMPS)/venv
	@command -v podman >/dev/null && command -v debootstrap >/dev/null || { \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq podman debootstrap; }
	$(PY) -m tools.k8s_smoke

# One image per role (edge: router + edge node; cloud: cloud_inference; registry), with
# docker when its daemon runs, else podman; offline (tools/image_build.py, README).
IMAGE_REPOSITORY ?= ghcr.io/hybridmesh
IMAGE_TAG ?= 0.1.0
image: $(STAMPS)/venv
	$(PY) -m tools.image_build --repository $(IMAGE_REPOSITORY) --tag $(IMAGE_TAG)

# The main job: the whole mesh as real processes on loopback, the test split through it.
demo: setup
	$(VENV)/bin/hybridmesh demo

# Routing quality, latency/throughput against baselines, faults under load (~10 min);
# writes results/bench/ and docs/benchmarks.md. BENCH_ARGS=--quick for a short run.
bench: setup
	$(VENV)/bin/python -m bench --out results/bench $(BENCH_ARGS)

up: setup
	$(VENV)/bin/hybridmesh up

down:
	$(VENV)/bin/hybridmesh down

clean:
	rm -rf $(STAMPS) $(VENV) .venv-train node_modules .mypy_cache .ruff_cache .pytest_cache
