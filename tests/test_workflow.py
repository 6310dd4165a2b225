"""The workflow itself: lint, planning of the default DAG, and a real run through serialization."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from vlretrieval.data.lmdb_store import SplitStore

from .conftest import REPO, BIN, snakemake_env, tiny_demo_entry


def test_lint_is_clean():
    proc = subprocess.run(
        [str(BIN / "snakemake"), "--lint"], cwd=REPO, capture_output=True, text=True, env=snakemake_env()
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Congratulations, your workflow is in a good condition" in proc.stdout + proc.stderr


def _job_counts(out: str) -> dict[str, int]:
    counts = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and parts[0] != "total":
            counts[parts[0]] = int(parts[1])
    return counts


def test_default_dag_plans_every_stage(workflow):
    counts = _job_counts(workflow.run("-n", "--quiet", "rules").stdout)
    # demo_cn x ernie_vil: the train split for fine-tuning, the test split for evaluation, and
    # two evaluated stages (zero-shot and fine-tuned), each extracted and ranked.
    assert counts == {
        "demo_archive": 1, "download": 1, "serialize": 2, "prepare_model": 1, "finetune": 1,
        "extract_features": 2, "rank": 2, "score": 1, "all": 1,
    }


def test_real_dataset_dag_plans_download_to_recall(workflow):
    proc = workflow.run("results/flickr30k_cn/ernie_vil/", "-n", "--quiet", "rules")
    counts = _job_counts(proc.stdout)
    assert counts == {
        "download": 1, "serialize": 2, "prepare_model": 1, "finetune": 1,
        "extract_features": 2, "rank": 2, "score": 1,
    }


def test_test_only_dataset_is_evaluated_zero_shot(workflow):
    counts = _job_counts(workflow.run("results/coco_cn/ernie_vil/", "-n", "--quiet", "rules").stdout)
    assert counts == {"download": 1, "serialize": 1, "prepare_model": 1, "extract_features": 1, "rank": 1, "score": 1}


@pytest.mark.slow
def test_demo_runs_through_serialization(workflow):
    sizes = {"train": 12, "valid": 4, "test": 6}
    workflow.write_config(
        {"grid": {"datasets": ["demo_tiny"], "models": ["ernie_vil"]}},
        datasets={"demo_tiny": tiny_demo_entry(sizes)},
    )
    targets = [f"resources/demo_tiny/lmdb/{split}" for split in sizes]
    workflow.run(*targets)
    root = workflow.workdir / "resources" / "demo_tiny"
    manifest = json.loads((root / "download" / "MANIFEST.json").read_text(encoding="utf-8"))
    assert manifest, "download wrote an empty manifest"
    for split, n_images in sizes.items():
        with SplitStore(root / "lmdb" / split) as store:
            assert store.num_images == n_images
            assert store.num_texts >= 5 * n_images
            texts = store.texts()
            assert all(t.text.strip() and t.image_ids for t in texts)
            assert set(i for t in texts for i in t.image_ids) == set(store.image_ids())
            assert store.open_image(store.image_ids()[0]).size == (64, 64)
        report = json.loads((root / "lmdb" / split / "validation_report.json").read_text(encoding="utf-8"))
        assert report  # the report exists for every split, even when nothing was skipped
    # a second run has nothing to do: outputs are complete and up to date
    second = workflow.run(*targets, "-n")
    assert "Nothing to be done" in second.stdout + second.stderr
