# Every target creates .venv itself, so `make run` and `make test` work on a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv run test unit lint clean

$(STAMP): requirements.txt requirements-dev.txt constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -r requirements.txt -r requirements-dev.txt
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

venv: $(STAMP)

# The whole product locally: control plane, exporter, Pub/Sub, functions, scheduled sweeps;
# applies examples/, waits until converged, prints status and a DNS answer; Ctrl-C stops it.
run: $(STAMP)
	$(BIN)/egressctl run

test: $(STAMP)
	$(BIN)/python -m pytest

unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

# Each benchmark is its own module in bench/ printing its figures; run them all in order.
# They start a dev stack of their own (.cache/dev-bench) and stop it afterwards.
BENCHMARKS := $(filter-out __init__ stack _%,$(basename $(notdir $(wildcard bench/*.py))))
bench: $(STAMP)
	@set -e; for m in $(BENCHMARKS); do echo "== bench.$$m"; $(BIN)/python -m bench.$$m; done

clean:
	-test -x $(BIN)/egressctl && $(BIN)/egressctl dev down
	rm -rf $(VENV) .cache .mypy_cache .ruff_cache .pytest_cache .hypothesis

# The real local control plane (etcd, kube-apiserver, controllers, CoreDNS, Pub/Sub emulator).
.PHONY: dev-up dev-down dev-status
dev-up: $(STAMP)
	$(BIN)/egressctl dev up

dev-down: $(STAMP)
	$(BIN)/egressctl dev down

dev-status: $(STAMP)
	$(BIN)/egressctl dev status

