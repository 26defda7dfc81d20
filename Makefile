# kvbench — `make help` lists the targets.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
PYTHON  := $(BIN)/python
STAMP   := $(VENV)/.installed-stamp
# The CPU build of torch these machines carry as a local file (an unpinned torch resolves to a
# multi-GB CUDA build). The GPU machine brings its own torch 2.11; pyproject asks for torch>=2.4.
TORCH_CPU ?= torch==2.13.0

.PHONY: help install test lint clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-15s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PYTHON) || $(PY) -m venv $(VENV)
	@$(PYTHON) -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_CPU)"
	$(BIN)/pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)  ## create .venv if missing and install kvbench with its dev tools

test: install  ## run the test suite (CPU, offline)
	$(PYTHON) -m pytest -q

lint: install  ## ruff
	$(BIN)/ruff check harness methods tasks scripts tests

clean:  ## remove generated results and caches (keeps .venv and committed baselines)
	rm -rf outputs multirun .pytest_cache .ruff_cache
	find results -mindepth 1 -maxdepth 1 ! -name baseline ! -name bench -exec rm -rf {} + 2>/dev/null || true
