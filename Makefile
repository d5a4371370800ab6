# Two commands do everything on a fresh machine: `make repro` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU build of torch by default (no multi-GB CUDA download on a machine without a GPU).
# GPU users: make repro TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: install repro test lint format bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[test,cluster]"
	touch $(STAMP)

install: $(STAMP)

# stage commands call `retina-vae`, so the venv's bin goes first on PATH
repro: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

test: $(STAMP)
	$(BIN)/ruff check pipeline vae_core tests bench
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check pipeline vae_core tests bench
	$(BIN)/ruff format --check pipeline vae_core tests bench

format: $(STAMP)
	$(BIN)/ruff format pipeline vae_core tests bench
	$(BIN)/ruff check --fix pipeline vae_core tests bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
