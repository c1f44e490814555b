# Two entry points, each self-contained on a fresh machine with Python >= 3.11:
#   make demo   -- the main job (`lnb demo`: matrix factorization + digits MLP, LNB vs Adam)
#   make test   -- lint + the test suite (notebooks included) + the strict docs build
# Both create/refresh the virtual environment in $(VENV) from pyproject.toml when it changed.

export NO_MKDOCS_2_WARNING := 1

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo demo-ref test test-slow lint format clean data docs docs-build

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "lnb needs Python >= 3.11, found " + sys.version.split()[0]'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
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
	$(PY) -m ruff format --check lnb_ref lnb_fast tests benchmarks

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format lnb_ref lnb_fast tests benchmarks

# The suite executes the notebooks (writing rendered copies to docs/notebooks/), then the docs
# site is built in strict mode from them, so CI (.ci/run -> make test) checks both.
test: lint
	$(PY) -m pytest
	$(MAKE) docs-build

# `make docs`: execute the notebooks, then build the site (strict: warnings and broken links
# fail) into build/site/.
docs: $(STAMP)
	$(PY) -m pytest -q tests/test_notebooks.py
	$(MAKE) docs-build

docs-build: $(STAMP)
	$(VENV)/bin/mkdocs build --strict --quiet

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis results build *.egg-info docs/notebooks/*.ipynb
