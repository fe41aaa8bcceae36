# Thin named wrappers; the README explains each. Everything runs from the project's own virtual environment.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test-tools run test lint typecheck proto bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py services/ledger/_native.c
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: setup
	$(BIN)/p2pgrid up

# Debian's prometheus (prometheus and promtool) for the dashboard tests; does nothing when present.
test-tools:
	bash scripts/install_test_tools.sh

test: setup test-tools lint typecheck
	$(BIN)/pytest

lint: setup
	$(BIN)/ruff check services tests scripts examples loadtest
	$(BIN)/ruff format --check services tests scripts examples loadtest

typecheck: setup
	$(BIN)/mypy

proto: setup
	$(BIN)/python scripts/gen_protos.py

bench: setup
	$(BIN)/p2pgrid bench all

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
