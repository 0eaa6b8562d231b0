# Two commands on a fresh machine: `make run` (the main job) and `make test` (the test suite).
# Both build the virtual environment from pyproject.toml + requirements.lock first, once.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run demo test ui bench clean-venv

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

clean-venv:
	rm -rf $(VENV)
