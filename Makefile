# Quick start: `make run` (the whole cluster on built-in defaults) and `make test` (the test suite).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-unit lint bench fuzz fuzz-smoke mutate clean

# `make fuzz`: each fuzz target (fuzz/targets.py) for FUZZ_SECONDS; `make test` runs a short pass of every one.
FUZZ_SECONDS ?= 60
FUZZ_SMOKE_SECONDS ?= 3
# `make mutate` (not part of `make test`): mutmut over cluster/queue and cluster/smtp with tests/unit ([tool.mutmut]
# in pyproject.toml), niced and stopped after MUTATE_MINUTES; a second run resumes where the first stopped.
MUTATE_MINUTES ?= 45

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/mtacluster up

test: $(STAMP) lint fuzz-smoke
	$(BIN)/pytest -q

test-unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

lint: $(STAMP)
	$(BIN)/ruff check cluster tests benchmarks fuzz
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m benchmarks.e2e

fuzz: $(STAMP)
	$(BIN)/python -m fuzz.run --seconds $(FUZZ_SECONDS)

fuzz-smoke: $(STAMP)
	$(BIN)/python -m fuzz.run --seconds $(FUZZ_SMOKE_SECONDS)

mutate: $(STAMP)
	-nice -n 19 timeout $$(( $(MUTATE_MINUTES) * 60 )) $(BIN)/mutmut run --max-children 2
	$(BIN)/mutmut export-cicd-stats
	cat mutants/mutmut-cicd-stats.json

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache mutants
