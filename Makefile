# Two entry points for a fresh machine: `make demo` and `make test`. Both set up first.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
CORES ?= all
# Tools installed into the venv must win over any on the machine.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup demo test lint bench clean-results

setup: $(VENV)/.installed

# The stamp makes setup idempotent: it reruns only when the pins or the package metadata change.
$(VENV)/.installed: requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check pip==25.3
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	$(BIN)/python -m pip check
	touch $@

demo: setup
	$(BIN)/snakemake --profile profiles/default --cores $(CORES)

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/snakemake --lint

bench: setup
	$(BIN)/python bench/bench_lmdb_build.py
	$(BIN)/python bench/bench_topk.py
	$(BIN)/python bench/bench_extract.py
	$(BIN)/python bench/bench_finetune.py

clean-results:
	rm -rf results logs benchmarks
