# `make demo` and `make test` create the virtual environment on first use and reuse it after;
# it is refreshed only when pyproject.toml or constraints.txt change.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.jaxlens-installed
# What `make setup` installs: the CPU test environment (`dev`: torch CPU, tuned-lens, pytest,
# libtpu for TPU compiles) where no accelerator is attached; on a TPU VM (/dev/accel*, /dev/vfio)
# jax with libtpu (`tpu`), on a machine with nvidia-smi jax's CUDA plugin (`cuda`), and no torch.
# `make setup EXTRAS=dev` forces the test environment.
EXTRAS ?= $(shell if ls /dev/accel* >/dev/null 2>&1 || [ -e /dev/vfio/0 ]; then echo tpu; \
  elif command -v nvidia-smi >/dev/null 2>&1; then echo cuda; else echo dev; fi)
DEMO_WORKDIR ?= workdirs/demo

.PHONY: setup demo serve test browser bench lint format clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[$(EXTRAS)]'
	touch $(STAMP)

demo: setup
	$(PY) -m jaxlens.train --config=configs/smollm2_shakespeare.py --workdir=$(DEMO_WORKDIR)

# The lens explorer on the embedded default: http://127.0.0.1:8000/ (SERVE_FLAGS="--lens=DIR ...").
serve: setup
	$(PY) -m jaxlens.serve $(SERVE_FLAGS)

# The explorer's browser test needs Debian's chromium and chromedriver: installed here when
# missing and we are root (as CI is); otherwise that one test says why it skips.
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	  else \
	    echo "note: /usr/bin/chromium is missing and installing it needs root; the browser test will skip"; \
	  fi; \
	fi

bench: setup
	$(PY) -m bench.run

test: setup browser
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
