# qrmfs: every target that needs the machine runs `setup` first (idempotent).
VENV    := .venv
PY      := $(VENV)/bin/python
export TESTCONTAINERS_RYUK_DISABLED := true
# Tests run in JOBS parallel workers (pytest-xdist), each test file whole on one worker, each worker with a lab
# of its own (qrmfs-lab-gw0, -gw1, ...): the QEMU boots, which are CPU-bound, then run side by side.
# `make test JOBS=0` runs them in one process against the default lab.
JOBS    ?= 2
PAR     := $(if $(filter 0,$(JOBS)),,-n $(JOBS) --dist loadfile --no-loadscope-reorder)

.PHONY: setup demo test test-fast unit e2e lint lab-up lab-down bench docs

setup:
	@bash scripts/setup.sh

demo: setup
	@$(PY) -m lab demo

test: setup
	$(PY) -m pytest $(PAR) --durations=25 tests/unit tests/e2e

test-fast: setup
	$(PY) -m pytest $(PAR) -m "not slow" tests/unit tests/e2e

unit: setup
	$(PY) -m pytest tests/unit

e2e: setup
	$(PY) -m pytest $(PAR) tests/e2e

lint: setup
	$(VENV)/bin/ruff check qrmfs lab tests bench ansible scripts
	$(VENV)/bin/mypy qrmfs lab bench/run.py bench/mechanisms.py bench/ansible_fanout.py

lab-up: setup
	@$(PY) -m lab up

lab-down: setup
	@$(PY) -m lab down

bench: setup
	@$(PY) bench/run.py $(ARGS)

# docs/cli.md from the typer app (tests/unit/test_docs.py fails when it is out of date)
docs: setup
	@$(PY) scripts/cli_docs.py
