# Two commands on a fresh machine with only Python: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck pytest faults bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/sessions demo

lint: $(STAMP)
	$(BIN)/ruff check sessions workers tests bench examples celeryconfig.py

typecheck: $(STAMP)
	$(BIN)/mypy sessions workers celeryconfig.py

pytest: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

test: lint typecheck pytest

# The fault suite (tests/faults) at a larger scale than `make test` runs it; prints its table.
FAULTS_SCALE ?= 5
faults: $(STAMP)
	SESSIONS_FAULTS_SCALE=$(FAULTS_SCALE) $(BIN)/pytest tests/faults --timeout=1800 -rxX $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench.ingest
	$(BIN)/python -m bench.sweeps
	$(BIN)/python -m bench.dashboard

clean:
	rm -rf $(VENV) .sessions-broker sessions.db sessions.db-* .mypy_cache .ruff_cache
