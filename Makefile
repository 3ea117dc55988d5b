PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-local test test-all lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

## make demo: run the procurement scenario on embedded nats-server, Valkey and Ray
demo: $(STAMP)
	$(BIN)/govmesh run scenarios/procurement.yaml --workflows 20 --seed 7

## make demo-local: the procurement scenario (5 workflows) on a real model on this machine,
## SmolLM2-135M-Instruct on CPU behind llama-cpp-python's server (from the dev extra)
demo-local: $(STAMP)
	$(BIN)/govmesh model serve -- $(BIN)/govmesh run scenarios/procurement-local.yaml --workflows 5 --seed 7

## make test: the test suite (slow stress tests excluded; `make test-all` runs them too)
test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ''

lint: $(STAMP)
	$(BIN)/ruff check govmesh tests
	$(BIN)/ruff format --check govmesh tests
	$(BIN)/mypy
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
