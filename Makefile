# Two commands for a fresh machine:
#   make demo   -- set up .venv and run the main job on the small built-in default
#   make test   -- set up .venv and run the test suite (offline)
# torch==2.13.0 is installed first so that pip never resolves the package's torch range to a
# multi-GB CUDA build on a CPU machine; users with a GPU build of torch can skip the Makefile.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.13.0

export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test,memory,offline,lora]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/nbs demo

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

bench: $(STAMP)
	$(BIN)/python bench/bench_coconut.py

clean:
	rm -rf $(VENV) runs
