# `make demo` and `make test` create the virtual environment on first use and reuse it after;
# it is refreshed only when pyproject.toml or constraints.txt change.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.jaxlens-installed
DEMO_WORKDIR ?= workdirs/demo

.PHONY: setup demo test bench lint format clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(PY) -m jaxlens.train --config=configs/smollm2_shakespeare.py --workdir=$(DEMO_WORKDIR)

bench: setup
	$(PY) -m bench.run

test: setup
	$(PY) -m ruff check jaxlens tests configs bench
	$(PY) -m ruff format --check jaxlens tests configs bench
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check jaxlens tests configs bench

format: setup
	$(PY) -m ruff format jaxlens tests configs bench
	$(PY) -m ruff check --fix jaxlens tests configs bench

clean:
	rm -rf $(VENV)
