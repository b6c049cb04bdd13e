# The two commands of this project: `make demo` (the main job) and `make test`. Both bootstrap .venv from
# nothing. PyTorch is installed first, on its own, so that its build can be chosen:
#   TORCH: the version we test with. On this project's CPU machines pip finds its CPU-only build on local
#          disk; elsewhere pip takes the same release from PyPI. `make test TORCH='torch>=2.1'` takes the newest.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA_ROOT ?=
THREADS ?= 2

.PHONY: demo test test-kernels lint format bench data clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# Fashion-MNIST, our embedded default, is Debian's package dataset-fashion-mnist; its folder is asked of
# cascadenet.data.datasets.DEFAULT_ROOTS, so that it is written in one place. Install it when missing and apt is
# usable; otherwise point DATA_ROOT at a folder holding the four IDX files.
data: $(STAMP)
	@if [ -z "$(DATA_ROOT)" ]; then \
	  root="$$($(BIN)/python -c 'from cascadenet.data.datasets import DEFAULT_ROOTS; print(DEFAULT_ROOTS["fashion-mnist"])')" \
	    || exit 1; \
	  if [ ! -e "$$root/train-images-idx3-ubyte.gz" ]; then \
	    if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	      apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	      { apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; }; \
	    else \
	      echo "Fashion-MNIST is missing from $$root: install Debian's dataset-fashion-mnist or run 'make demo DATA_ROOT=DIR'"; \
	      exit 2; \
	    fi; \
	  fi; \
	fi

# The main job: CascadedTD vs CascadedCE on Fashion-MNIST (about 10 minutes on 2 CPU cores), report in
# runs/demo/report.md. Finished runs are reused and unfinished ones resumed, so it can be re-run or interrupted.
demo: $(STAMP) data
	$(BIN)/cascadenet demo --out runs/demo --threads $(THREADS) $(if $(DATA_ROOT),--data-root $(DATA_ROOT))

test: $(STAMP) lint
	$(BIN)/python -m pytest

# The suite under the CPU kernels of other machines (AVX2, then plain SSE; PyTorch, oneDNN and MKL each told):
# float32 rounding differs between them, and a tolerance fitted to one CPU fails on the next.
test-kernels: $(STAMP)
	ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 $(BIN)/python -m pytest -q
	ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 MKL_ENABLE_INSTRUCTIONS=SSE4_2 $(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: $(STAMP)
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/ruff format src tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/engine.py --threads $(THREADS)

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
