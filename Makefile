# Quick start on a fresh machine: `make demo` (the whole graph offline: bundled real SCIN metadata, SYNTHETIC
# images) and `make test` (the test suite). `make run` is the real job on the public bucket.
# Each builds the virtual environment from pyproject.toml + requirements.lock first, once.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run demo test test-fast test-shuffled lint ui clean-venv

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip==25.3"
	$(PY) -m pip install --quiet -c requirements.lock -e ".[dev]"
	# Postgres storage for Dagster (docker/, the topology test). --no-deps: dagster-postgres's newest release
	# pins dagster==1.13.27 exactly, one patch behind ours; its code works with 1.13.28 (tested).
	$(PY) -m pip install --quiet --no-deps -c requirements.lock dagster-postgres psycopg2-binary
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/scin-pipeline run $(ARGS)

demo: $(STAMP)
	$(VENV)/bin/scin-pipeline demo $(ARGS)

ui: $(STAMP)
	$(VENV)/bin/scin-pipeline ui $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile $(ARGS)

# Lint and format check (ruff, configured in pyproject.toml); .ci/run runs it before the tests.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The tests that need no end-to-end run of the graph (about a minute): for the edit-test loop.
test-fast: $(STAMP)
	$(PY) -m pytest -n 2 -m "not slow" $(ARGS)

# The suite in a shuffled order (pytest-randomly): `make test-shuffled SEED=7`. Tests must not depend on
# their order; this is how that is checked.
SEED ?= 1
test-shuffled: $(STAMP)
	$(PY) -m pytest -n 2 -p randomly --randomly-seed=$(SEED) $(ARGS)

clean-venv:
	rm -rf $(VENV)
