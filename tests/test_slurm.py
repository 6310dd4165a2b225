"""Real SLURM submission: the tiny demo pair through profiles/slurm on a live cluster.

Opt-in, because it needs a running SLURM cluster with accounting (sacct) and the slurm executor
plugin: `make test-slurm` starts a one-node cluster on this machine (ci/slurm/start.sh, as root)
and runs this file with VLRETRIEVAL_SLURM=1.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from .conftest import REPO, Workflow, tiny_demo_entry

ENABLED = os.environ.get("VLRETRIEVAL_SLURM") == "1"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not ENABLED,
        reason="SLURM stage is opt-in: run `make test-slurm` (as root: installs and starts a one-node "
        "cluster with ci/slurm/start.sh), or set VLRETRIEVAL_SLURM=1 with a running cluster",
    ),
]

SIZES = {"train": 16, "test": 12}
TARGET = "results/demo_tiny/ernie_vil"
# Every rule between the demo archive and metrics.json (export_stage: extraction runs through the
# inference engine by default).
RULES = {
    "demo_archive", "download", "serialize", "prepare_model", "finetune", "export_stage", "extract_features",
    "rank", "score",
}


def _write_config(workflow: Workflow) -> None:
    train = {
        "max_steps": 4, "per_device_train_batch_size": 4, "warmup_steps": 0,
        "recompute": False, "hflip": False, "save_steps": 50,
    }  # fmt: skip
    workflow.write_config(
        {
            "grid": {"datasets": ["demo_tiny"], "models": ["ernie_vil"]},
            # Two ranks as in the demo: results are only comparable at the same number of ranks.
            "finetune": {"gpus": 0, "cpu_ranks": 2},
            "pair_overrides": {"demo_tiny": {"*": {"init": "tiny", "train": train}}},
        },
        datasets={"demo_tiny": tiny_demo_entry(SIZES)},
    )


def _sacct(job_ids: list[str]) -> list[dict[str, str]]:
    fields = ["JobIDRaw", "JobName", "Comment", "State", "Partition", "Account", "AllocCPUS"]
    out = subprocess.run(
        ["sacct", "-X", "--parsable2", "--noheader", f"--format={','.join(fields)}", "--jobs", ",".join(job_ids)],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    return [dict(zip(fields, line.split("|"))) for line in out.splitlines() if line]


def _losses(train_log: Path) -> list[float]:
    rows = [json.loads(line) for line in train_log.read_text(encoding="utf-8").splitlines()]
    losses = [row["loss"] for row in rows if row.get("event") == "train"]
    assert losses
    return losses


@pytest.fixture(scope="module")
def cluster() -> None:
    """Opted in, a missing piece is an error, not a skip: the stage must not pass without running."""
    missing = [tool for tool in ("sbatch", "sacct", "sinfo") if shutil.which(tool) is None]
    assert not missing, f"SLURM client tools not found: {missing}; start the cluster with ci/slurm/start.sh"
    assert importlib.util.find_spec("snakemake_executor_plugin_slurm"), (
        "snakemake-executor-plugin-slurm is not installed in this environment"
    )
    states = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    assert states.returncode == 0 and re.search(r"idle|mixed", states.stdout), (
        f"no SLURM node is up: {states.stdout}{states.stderr}"
    )


def test_demo_pair_through_slurm_matches_local_run(cluster, tmp_path: Path):
    local = Workflow(tmp_path / "local")
    on_slurm = Workflow(tmp_path / "slurm")
    for workflow in (local, on_slurm):
        workflow.workdir.mkdir()
        _write_config(workflow)

    proc = on_slurm.run(
        TARGET,
        "--profile", str(REPO / "profiles" / "slurm"),
        # The first status query waits 40 s by default, long on a cluster of one idle node.
        "--slurm-init-seconds-before-status-checks", "2",
        timeout=1500,
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    job_ids = re.findall(r"has been submitted with SLURM jobid (\d+)", output)
    assert job_ids, output[-4000:]

    # SLURM's accounting saw every job, each ran to completion, and together they are the pair's rules
    # (the executor writes rule and wildcards into the job comment; sacct returns comments where the
    # cluster stores them, AccountingStoreFlags=job_comment, as ci/slurm/start.sh configures).
    jobs = _sacct(job_ids)
    assert sorted(job["JobIDRaw"] for job in jobs) == sorted(job_ids), jobs
    assert all(job["State"] == "COMPLETED" for job in jobs), jobs
    rules = {re.match(r"rule_([A-Za-z0-9_]+?)(?:_wildcards_.*)?$", job["Comment"]).group(1) for job in jobs}
    assert rules == RULES, jobs
    assert len({job["JobName"] for job in jobs}) == 1  # the run's id: how the executor finds its jobs
    for variable, column in (("SBATCH_PARTITION", "Partition"), ("SBATCH_ACCOUNT", "Account")):
        if os.environ.get(variable):
            assert {job[column] for job in jobs} == {os.environ[variable]}, jobs
    finetune = next(job for job in jobs if job["Comment"].startswith("rule_finetune"))
    assert finetune["AllocCPUS"] == "2"  # one core per rank

    # snakemake's per-job SLURM logs, kept by the profile.
    slurm_logs = on_slurm.workdir / ".snakemake" / "slurm_logs"
    for job in jobs:
        rule = re.match(r"rule_([A-Za-z0-9_]+?)(?:_wildcards_.*)?$", job["Comment"]).group(1)
        logs = list((slurm_logs / f"rule_{rule}").rglob(f"{job['JobIDRaw']}.log"))
        assert len(logs) == 1, f"no SLURM log for job {job['JobIDRaw']} ({rule}) under {slurm_logs}"
    assert (on_slurm.workdir / "logs" / "finetune" / "demo_tiny" / "ernie_vil.log").is_file()

    # The same pair run locally computes exactly the same: on CPU with the same number of ranks the
    # pipeline is deterministic, so weights, features and numbers are equal to the bit.
    local.run(TARGET, timeout=1500)
    on_cluster = json.loads((on_slurm.workdir / TARGET / "metrics.json").read_text(encoding="utf-8"))
    here = json.loads((local.workdir / TARGET / "metrics.json").read_text(encoding="utf-8"))
    assert set(on_cluster["stages"]) == {"zeroshot", "finetuned"}
    assert on_cluster == here
    pair = Path("work/demo_tiny/ernie_vil")
    weights = pair / "models/finetuned/model_state.pdparams"
    assert (on_slurm.workdir / weights).read_bytes() == (local.workdir / weights).read_bytes()
    assert (on_slurm.workdir / weights).read_bytes() != (on_slurm.workdir / pair / "models/init/model_state.pdparams").read_bytes()
    for stage in ("zeroshot", "finetuned"):
        for kind in ("images", "texts"):
            vectors = pair / stage / "features" / kind / "vectors.npy"
            assert (on_slurm.workdir / vectors).read_bytes() == (local.workdir / vectors).read_bytes(), vectors
    assert _losses(on_slurm.workdir / pair / "train_log.jsonl") == _losses(local.workdir / pair / "train_log.jsonl")
