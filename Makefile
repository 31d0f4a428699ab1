# Quick start: `make run` (the whole cluster on built-in defaults) and `make test` (the test suite).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-unit lint bench fuzz fuzz-smoke mutate clean compiled pure

# Compiled modules: tools/compile_native.py compiles the modules listed in pyproject.toml's
# [tool.mtacluster.compiled] with mypyc, beside their sources, and writes $(COMPILED) (the manifest that
# cluster/compiled.py checks at import). Rebuilt when a listed source changes; without a C compiler the cluster runs
# as pure Python after one warning (with CI=true that fails the build). `make pure` removes the build and keeps it
# off, `make compiled` builds again.
COMPILED := cluster/_compiled.json
COMPILED_SOURCES := $(shell $(PYTHON) tools/compile_native.py --sources 2>/dev/null)

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

$(COMPILED): $(STAMP) pyproject.toml tools/compile_native.py $(COMPILED_SOURCES)
	$(BIN)/python tools/compile_native.py

compiled: $(STAMP)
	$(BIN)/python tools/compile_native.py --force

pure: $(STAMP)
	$(BIN)/python tools/compile_native.py --pure

run: $(STAMP) $(COMPILED)
	$(BIN)/mtacluster up

test: $(STAMP) $(COMPILED) lint fuzz-smoke
	$(BIN)/pytest -q

test-unit: $(STAMP) $(COMPILED)
	$(BIN)/pytest -q tests/unit

lint: $(STAMP)
	$(BIN)/ruff check cluster tests benchmarks fuzz tools
	$(BIN)/mypy

bench: $(STAMP) $(COMPILED)
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
	$(PYTHON) tools/compile_native.py --remove
	rm -rf $(VENV) var build .pytest_cache .mypy_cache .ruff_cache mutants
