# One venv, one set of commands. `make demo` and `make test` are the README's two commands.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test lint bench

$(BIN)/svp: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: the CPU wheel on local disk (a plain `torch` pulls a CUDA build).
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(BIN)/svp

setup: $(BIN)/svp

demo: setup
	$(BIN)/svp demo

test: setup
	$(BIN)/python -m pytest -q -ra

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy svp services gateway

bench: setup
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done
