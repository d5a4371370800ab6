# Two commands do everything on a fresh machine: `make repro` and `make test`; `make ui` then
# opens the results in MLflow, `make exps` compares DVC experiments.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU build of torch by default (no multi-GB CUDA download on a machine without a GPU).
# GPU users: make repro TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
STAMP      := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
# pyproject's requires-python
SUPPORTED  := 3.10 3.11 3.12

.DEFAULT_GOAL := install
.PHONY: install install-test python-check repro baseline exps ui test lint format bench clean

# Before anything is installed: the interpreter (or an existing .venv's) must be supported.
python-check:
	@if [ -x $(BIN)/python ]; then py=$(BIN)/python; else py="$(PYTHON)"; fi; \
	v=$$($$py -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || echo none); \
	case " $(SUPPORTED) " in *" $$v "*) exit 0;; esac; \
	if [ -x $(BIN)/python ]; then \
	  echo "make: $(VENV) has Python $$v but retina-vae needs 3.10-3.12: run 'make clean', then 'make $(or $(MAKECMDGOALS),install) PYTHON=python3.12'"; \
	else \
	  echo "make: $(PYTHON) is Python $$v but retina-vae needs 3.10-3.12: run 'make $(or $(MAKECMDGOALS),install) PYTHON=python3.12' (or another 3.10-3.12 interpreter)"; \
	fi; exit 1

$(BIN)/python: | python-check
	@echo "==> creating $(VENV) with $$($(PYTHON) --version)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# About 2.4 GB in .venv (torch, Ray, MLflow, DVC and their dependencies); 1-2 min with a warm
# pip cache. pip shows its downloads as it goes.
$(STAMP): pyproject.toml | python-check $(BIN)/python
	@echo "==> installing torch ($(TORCH_SPEC)) unless a torch is there"
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --progress-bar on $(TORCH_SPEC)
	@echo "==> installing retina-vae and its dependencies into $(VENV)"
	$(BIN)/python -m pip install --progress-bar on -e .
	touch $(STAMP)
	@echo "==> installed"

# the test tools (pytest, ruff, playwright): `make test` needs them, `make repro` does not
$(TEST_STAMP): $(STAMP)
	@echo "==> installing the test extras (pytest, ruff, playwright; Ray's dashboard for the job tests)"
	$(BIN)/python -m pip install -q -e ".[test,cluster]"
	touch $(TEST_STAMP)

install: $(STAMP)
install-test: $(TEST_STAMP)

# stage commands call `retina-vae`, so the venv's bin goes first on PATH
repro: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

# The committed baseline that `dvc exp show` and `dvc metrics diff` compare against: the whole
# pipeline at the committed params, then dvc.lock and metrics/ staged for a commit.
baseline: $(STAMP)
	@git diff --quiet HEAD -- params.yaml || { echo "make: params.yaml differs from the last commit: commit or revert it first (the baseline is the committed params' run)"; exit 1; }
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro
	git add dvc.lock metrics
	@echo "==> dvc.lock and metrics/ are staged: commit them, e.g. git commit -m 'baseline: make baseline'"

# DVC experiments side by side: the params each changed, the headline metrics (120 columns)
exps: $(STAMP)
	@PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/retina-vae exps

# the MLflow UI on the local store; prints the newest run's page (model-training view)
PORT ?= 5000
ui: $(STAMP)
	@$(BIN)/retina-vae ui --port $(PORT)

test: $(TEST_STAMP)
	$(BIN)/ruff check pipeline vae_core tests bench
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest

lint: $(TEST_STAMP)
	$(BIN)/ruff check pipeline vae_core tests bench
	$(BIN)/ruff format --check pipeline vae_core tests bench

format: $(TEST_STAMP)
	$(BIN)/ruff format pipeline vae_core tests bench
	$(BIN)/ruff check --fix pipeline vae_core tests bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
