# `make demo` and `make test` create the virtual environment on first use and reuse it after;
# it is refreshed only when pyproject.toml or constraints.txt change.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.jaxlens-installed

.PHONY: setup demo test lint format clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(PY) -m jaxlens.demo

test: setup
	$(PY) -m ruff check jaxlens tests
	$(PY) -m ruff format --check jaxlens tests
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check jaxlens tests

format: setup
	$(PY) -m ruff format jaxlens tests
	$(PY) -m ruff check --fix jaxlens tests

clean:
	rm -rf $(VENV)
