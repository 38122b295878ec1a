# One venv, one set of commands. `make demo` and `make test` are the README's two commands.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

# The Compose Specification's JSON schema ships inside this wheel (compose/config/compose_spec.json);
# tests/deploy validates docker-compose.yml against it. Nothing from it is installed or run.
COMPOSE_WHEEL := .cache/wheels/docker_compose-1.29.2-py2.py3-none-any.whl

.PHONY: setup prerequisites demo test lint bench

# What the stack and the evaluation need beyond Python, checked before anything long starts:
# redis-server (the broker and run store) and a Java runtime (pycocoevalcap's tokenizer). As root
# with apt-get, they are installed; otherwise the command to run is printed.
prerequisites:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v java >/dev/null || missing="$$missing default-jre-headless"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "SVP needs$$missing; install with: sudo apt-get install -y$$missing" >&2; exit 1; \
	  fi; \
	fi

$(BIN)/svp: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: the CPU wheel on local disk (a plain `torch` pulls a CUDA build).
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(BIN)/svp

$(COMPOSE_WHEEL): | $(BIN)/svp
	$(BIN)/pip download -q --no-deps -d $(dir $@) docker-compose==1.29.2

setup: prerequisites $(BIN)/svp $(COMPOSE_WHEEL)

demo: setup
	$(BIN)/svp demo

test: setup
	$(BIN)/python -m pytest -q -ra

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy svp services gateway

bench: setup
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done
