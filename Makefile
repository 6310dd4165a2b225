# Two entry points for a fresh machine: `make demo` and `make test`. Both set up first.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
CORES ?= all
# Tools installed into the venv must win over any on the machine.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup setup-test demo test test-slurm slurm-stop lint bench clean-results

setup: $(VENV)/.installed

# The stamp makes setup idempotent: it reruns only when the pins or the package metadata change.
$(VENV)/.installed: requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check pip==25.3
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	$(BIN)/python -m pip check
	touch $@

# The run ends on its results: the leaderboard in short and where to look next.
demo: setup
	$(BIN)/snakemake --profile profiles/default --cores $(CORES)
	@$(BIN)/python -m vlretrieval overview

# Test-only pins (torch CPU, transformers) for the weight-converter tests, on top of setup.
setup-test: $(VENV)/.installed-test

$(VENV)/.installed-test: $(VENV)/.installed requirements-test.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-test.lock -c requirements.lock
	$(BIN)/python -m pip check
	touch $@

test: setup-test
	$(BIN)/python -m pytest -q

# Opt-in, not part of `make test`: a one-node SLURM cluster on this machine (root and apt;
# ci/slurm/start.sh installs and starts it) and the demo pair submitted through profiles/slurm.
SLURM_PARTITION ?= debug
SLURM_ACCOUNT ?= vlretrieval
test-slurm: setup
	VLRETRIEVAL_SLURM_PARTITION=$(SLURM_PARTITION) VLRETRIEVAL_SLURM_ACCOUNT=$(SLURM_ACCOUNT) bash ci/slurm/start.sh
	VLRETRIEVAL_SLURM=1 SBATCH_PARTITION=$(SLURM_PARTITION) SBATCH_ACCOUNT=$(SLURM_ACCOUNT) $(BIN)/python -m pytest -q tests/test_slurm.py

slurm-stop:
	bash ci/slurm/stop.sh

lint: setup
	$(BIN)/snakemake --lint

bench: setup
	$(BIN)/python bench/bench_lmdb_build.py
	$(BIN)/python bench/bench_topk.py
	$(BIN)/python bench/bench_extract.py
	$(BIN)/python bench/bench_finetune.py
	$(BIN)/python bench/bench_url_download.py
	$(BIN)/python bench/bench_inference.py
	$(BIN)/python bench/bench_arrow.py
	$(BIN)/python bench/bench_rerank.py
	$(BIN)/python bench/bench_bridgetower.py

clean-results:
	rm -rf results logs benchmarks
