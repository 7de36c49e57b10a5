# Two commands matter: `make run` and `make test` (see README.md).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test lint bench bench-actors clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

## Start the daemon on the embedded default (in memory, 127.0.0.1:8050).
run: $(STAMP)
	$(VENV)/bin/actor-broker serve

## Run the linter, the type checker (pyproject.toml [tool.mypy]), then the whole test suite.
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

## Fan-out benchmark: actor-broker (memory, Redis, two nodes) against bare Tornado, FastAPI and Node ws (bench/README.md).
$(VENV)/.bench-installed: $(STAMP) setup.cfg
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $@

bench: $(VENV)/.bench-installed
	@test -d bench/loadgen/node_modules/ws || (cd bench/loadgen && npm ci --no-audit --no-fund)
	$(PY) bench/run.py $(BENCH_ARGS)

## Actor runtime micro-benchmark (about a minute).
bench-actors: $(STAMP)
	$(PY) bench/actors.py

clean:
	rm -rf $(VENV) build *.egg-info
