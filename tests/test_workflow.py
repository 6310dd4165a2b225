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


def test_default_dag_plans_every_stage(workflow):
    proc = workflow.run("-n", "--quiet", "rules")
    out = proc.stdout + proc.stderr
    assert _job_count(out, "demo_archive") == 1
    # one serialization job per registered split of the demo
    splits = yaml.safe_load((REPO / "config" / "datasets.yaml").read_text(encoding="utf-8"))["demo_cn"]["splits"]
    assert _job_count(out, "serialize") == len(splits)
    assert _job_count(out, "download") == 1


def _job_count(out: str, rule: str) -> int:
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == rule and parts[1].isdigit():
            return int(parts[1])
    raise AssertionError(f"no job count for {rule} in:\n{out}")


def test_real_dataset_dag_plans_download(workflow):
    workflow.write_config({"grid": {"datasets": ["flickr30k_cn"], "models": ["ernie_vil"]}})
    out = workflow.run("-n", "--quiet", "rules").stdout
    assert _job_count(out, "download") == 1
    assert _job_count(out, "serialize") == 3
    assert "demo_archive" not in out


@pytest.mark.slow
def test_demo_runs_through_serialization(workflow):
    sizes = {"train": 12, "valid": 4, "test": 6}
    workflow.write_config(
        {"grid": {"datasets": ["demo_tiny"], "models": ["ernie_vil"]}},
        datasets={"demo_tiny": tiny_demo_entry(sizes)},
    )
    workflow.run()
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
    second = workflow.run("-n")
    assert "Nothing to be done" in second.stdout + second.stderr
