# Two entry points, each self-contained on a fresh machine with Python >= 3.11:
#   make demo   -- the main job (`lnb demo`: matrix factorization + digits MLP, LNB vs Adam)
#   make test   -- lint + the test suite (notebooks included) + the strict docs build
# Both create/refresh the virtual environment in $(VENV) from pyproject.toml when it changed.

export NO_MKDOCS_2_WARNING := 1
# Python writes the bytecode of what it imports to __pycache__ (ignored by git) even where the
# environment sets PYTHONDONTWRITEBYTECODE, so the venv is not byte-compiled whole up front
# (uv's --compile-bytecode: about 9 s of its 14 s, 7,800 files): each module the commands
# import is compiled once, by the first process that imports it (docs/testing.md, "Time").
unexport PYTHONDONTWRITEBYTECODE
# Hypothesis examples: `ci` is small and derandomized (reproducible); `dev`, the default of a plain
# `pytest`, explores (docs/testing.md). `LNB_HYPOTHESIS_PROFILE=dev make test` to explore here.
export LNB_HYPOTHESIS_PROFILE ?= ci
# Two pytest-xdist workers (`make test PYTEST_WORKERS=0` runs in one process).
PYTEST_WORKERS ?= 2

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo demo-ref test test-slow lint format clean data docs docs-build peers-env peers

# The environment is installed by uv (a PyPI package, put into the venv by the interpreter's own
# pip): it installs the same versions in seconds where pip takes about 37 s on 2 cores
# (docs/testing.md, "Time"). Where that fails (no uv for this platform, PyPI out of reach: uv reads no pip.conf, so a mirror set up
# for pip only is not used), pip installs the environment instead; `make test INSTALLER=pip`
# uses pip from the start.
INSTALLER ?= uv

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "lnb needs Python >= 3.11, found " + sys.version.split()[0]'
	@if [ "$(INSTALLER)" = uv ] && $(PYTHON) -m venv --without-pip $(VENV) \
	    && $(PYTHON) -m pip --python $(PY) install --quiet uv \
	    && $(VENV)/bin/uv pip install --quiet --python $(PY) -e ".[dev]" pip; then \
	  echo "installed .[dev] into $(VENV) with uv"; \
	else \
	  [ "$(INSTALLER)" = pip ] || echo "uv could not install .[dev]: installing it with pip"; \
	  $(PYTHON) -m venv $(VENV) && $(PY) -m pip install --quiet --upgrade pip \
	    && $(PY) -m pip install --quiet -e ".[dev]"; \
	fi
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m lnb demo

demo-ref: $(STAMP)
	$(PY) -m lnb_ref demo

# Fashion-MNIST for `lnb reproduce ... --dataset fashion-mnist` (Debian/Ubuntu; needs root/sudo).
data:
	@test -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz \
	  || { command -v apt-get >/dev/null || { echo "make data needs apt-get; otherwise pass --data-path to the IDX files"; exit 2; }; \
	       $$(command -v sudo >/dev/null && [ "$$(id -u)" != 0 ] && echo sudo) apt-get install -y dataset-fashion-mnist; }

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check lnb_ref lnb_fast tests benchmarks tools

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format lnb_ref lnb_fast tests benchmarks tools

# The suite runs on $(PYTEST_WORKERS) workers. One of them executes the notebooks (they write
# their rendered copies to docs/notebooks/), then tests/test_site.py builds the docs site from
# them (mkdocs build --strict), checks its links (tools/check_site.py) and opens it in headless
# Chromium where it is installed, while the other worker runs the rest; so CI (.ci/run -> make
# test) checks all of it.
test: lint
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup

# `make docs`: execute the notebooks, then build the site into build/site/ and check it: every
# relative link and #anchor of every page, notebook pages included, must resolve
# (tools/check_site.py), and, where Chromium is installed, the maths must be typeset offline
# from file:// (tests/test_site.py, which builds the site). The site works offline: MathJax
# ships with it.
docs: $(STAMP)
	$(PY) -m pytest -q tests/test_notebooks.py tests/test_site.py

docs-build: $(STAMP)
	$(VENV)/bin/mkdocs build --strict --quiet
	$(PY) tools/check_site.py build/site

# LNB against Adam, K-FAC, Muon and PSGD-Kron on Fashion-MNIST (benchmarks/peers.py). kfac-jax
# 0.0.8 needs JAX <= 0.9.1, so the peers run in their own environment, where lnb_fast runs too.
PEERS_VENV ?= .venv-kfac
PEERS_STAMP := $(PEERS_VENV)/.installed

$(PEERS_STAMP): pyproject.toml
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(PEERS_VENV)/bin/python -m pip install --quiet -e ".[peers]"
	@touch $(PEERS_STAMP)

peers-env: $(PEERS_STAMP)

peers: $(PEERS_STAMP) data
	$(PEERS_VENV)/bin/python benchmarks/peers.py

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis results build *.egg-info docs/notebooks/*.ipynb
