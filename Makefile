PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BASE := $(VENV)/.installed-base
LOCAL := $(VENV)/.installed-local

.PHONY: demo demo-local test test-all lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Each target installs what it needs, and no more: the demo needs govmesh alone, the
# local model's demo also the local extra (llama-cpp-python compiles llama.cpp on its
# first install), the tests and the linters the dev extra (which includes the local one).
$(BASE): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $(BASE)

$(LOCAL): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[local]'
	touch $(LOCAL) $(BASE)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP) $(LOCAL) $(BASE)

## make demo: run the procurement scenario on embedded nats-server, Valkey and Ray
demo: $(BASE)
	$(BIN)/govmesh run scenarios/procurement.yaml --workflows 20 --seed 7

## make demo-local: the procurement scenario (5 workflows) on a real model on this machine,
## SmolLM2-135M-Instruct on CPU behind llama-cpp-python's server (the local extra)
demo-local: $(LOCAL)
	$(BIN)/govmesh model serve -- $(BIN)/govmesh run scenarios/procurement-local.yaml --workflows 5 --seed 7

## make test: the test suite (slow stress tests excluded; `make test-all` runs them too, and
## draws four times as many examples in the property tests)
test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15

test-all: $(STAMP)
	GOVMESH_TEST_DEPTH=4 $(BIN)/python -m pytest -q -m ''

lint: $(STAMP)
	$(BIN)/ruff check govmesh tests
	$(BIN)/ruff format --check govmesh tests
	$(BIN)/mypy
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
