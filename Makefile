# Quick start on a fresh machine: `make demo` (the whole graph offline: bundled real SCIN metadata, SYNTHETIC
# images) and `make test` (the test suite). `make run` is the real job on the public bucket.
# Each builds the virtual environment from pyproject.toml + requirements.lock first, once.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run demo test test-fast test-shuffled lint ui clean-venv lock

# dev: the test and lint tools; postgres: Dagster's Postgres storage (docker/, the topology test).
$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip==25.3"
	$(PY) -m pip install --quiet -c requirements.lock -e ".[dev,postgres]"
	touch $(STAMP)

# requirements.lock: the whole resolved set of pyproject.toml's dependencies with the dev and postgres
# extras (not imagededup), resolved by pip-compile (pip-tools) in a venv of its own, so it works while
# .venv cannot be installed from the old lock. Pins already in the lock are kept unless pyproject.toml
# rules them out; `make lock LOCK_ARGS=--upgrade` (or --upgrade-package NAME) moves them on purpose.
# Run it with the Python the lock is for (3.11: the CI's and docker/Dockerfile's).
LOCK_VENV ?= build/lock-venv
lock:
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet "pip==25.3" "pip-tools==7.6.2"
	CUSTOM_COMPILE_COMMAND="make lock" $(LOCK_VENV)/bin/pip-compile --quiet --extra dev --extra postgres \
		--strip-extras --no-annotate --no-emit-index-url --no-emit-find-links $(LOCK_ARGS) \
		--output-file requirements.lock pyproject.toml

run: $(STAMP)
	$(VENV)/bin/scin-pipeline run $(ARGS)

demo: $(STAMP)
	$(VENV)/bin/scin-pipeline demo $(ARGS)

ui: $(STAMP)
	$(VENV)/bin/scin-pipeline ui $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile $(ARGS)

# Lint, format and type check (ruff and pyright, both configured in pyproject.toml); .ci/run runs it before
# the tests.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pyright

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
