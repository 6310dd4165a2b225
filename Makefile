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

# Each bench writes its figures to $(BENCH_RESULTS)/<bench>.json; the table in docs/benchmarks.md
# is then regenerated from those files. bench_topk compares against faiss (test pins). The two
# cross-encoder benches run on 100 test images (2 and 1 minutes here): at their default 1,000,
# exhaustive VinVL scoring of 5M pairs alone takes about two hours at 700 pairs/s.
BENCH_RESULTS ?= bench/results
bench: setup-test
	mkdir -p $(BENCH_RESULTS)
	$(BIN)/python bench/bench_lmdb_build.py --json $(BENCH_RESULTS)/bench_lmdb_build.json
	$(BIN)/python bench/bench_base64_decode.py --json $(BENCH_RESULTS)/bench_base64_decode.json
	$(BIN)/python bench/bench_topk.py --json $(BENCH_RESULTS)/bench_topk.json
	$(BIN)/python bench/bench_extract.py --json $(BENCH_RESULTS)/bench_extract.json
	$(BIN)/python bench/bench_finetune.py --json $(BENCH_RESULTS)/bench_finetune.json
	$(BIN)/python bench/bench_url_download.py --json $(BENCH_RESULTS)/bench_url_download.json
	$(BIN)/python bench/bench_inference.py --json $(BENCH_RESULTS)/bench_inference.json
	$(BIN)/python bench/bench_arrow.py --json $(BENCH_RESULTS)/bench_arrow.json
	$(BIN)/python bench/bench_bootstrap.py --json $(BENCH_RESULTS)/bench_bootstrap.json
	$(BIN)/python bench/bench_rerank.py --images 100 --json $(BENCH_RESULTS)/bench_rerank.json
	$(BIN)/python bench/bench_bridgetower.py --images 100 --json $(BENCH_RESULTS)/bench_bridgetower.json
	$(BIN)/python bench/table.py --results $(BENCH_RESULTS) --doc docs/benchmarks.md

clean-results:
	rm -rf results logs benchmarks
