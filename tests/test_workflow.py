"""The workflow itself: lint, planning of the default DAG, and a real run through serialization."""

from __future__ import annotations

import json
import subprocess

import pytest

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
    # two evaluated stages (zero-shot and fine-tuned), each extracted and ranked; then tracking,
    # the leaderboard and the report's figures.
    assert counts == {
        "demo_archive": 1, "download": 1, "serialize": 2, "prepare_model": 1, "finetune": 1,
        "extract_features": 2, "rank": 2, "score": 1, "track": 1, "leaderboard": 1,
        "recall_curves": 1, "loss_curve": 1, "all": 1,
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
    archive = workflow.workdir / "resources" / "sources" / "demo_tiny.zip"
    sidecar = (workflow.workdir / "resources" / "sources" / "demo_tiny.zip.sha256").read_text().split()[0]
    assert [(f["filename"], f["sha256"], f["size"]) for f in manifest["files"]] == [
        ("demo_tiny.zip", sidecar, archive.stat().st_size)
    ]
    for split, n_images in sizes.items():
        with SplitStore(root / "lmdb" / split) as store:
            assert store.num_images == n_images
            assert store.num_texts == 5 * n_images
            texts = store.texts()
            assert all(t.text.strip() and t.image_ids for t in texts)
            assert set(i for t in texts for i in t.image_ids) == set(store.image_ids())
            assert store.open_image(store.image_ids()[0]).size == (64, 64)
        report = json.loads((root / "lmdb" / split / "validation_report.json").read_text(encoding="utf-8"))
        assert report["counts"]["images"]["kept"] == n_images and report["counts"]["images"]["skipped"] == 0
        assert report["counts"]["texts"]["kept"] == 5 * n_images and report["skipped"] == []
    # a second run has nothing to do: outputs are complete and up to date
    second = workflow.run(*targets, "-n")
    assert "Nothing to be done" in second.stdout + second.stderr


def _brute_force_recall(predictions: dict[int, list[int]], gold: dict[int, set[int]], k: int) -> float:
    hits = sum(1 for query, relevant in gold.items() if relevant & set(predictions[query][:k]))
    return 100.0 * hits / len(gold)


@pytest.mark.slow
def test_demo_pair_end_to_end_meets_quality_bar(workflow):
    """The default grid, as `make demo` runs it: demo_cn x ernie_vil from archive to recall."""
    workflow.run()
    result = workflow.workdir / "results" / "demo_cn" / "ernie_vil"
    metrics = json.loads((result / "metrics.json").read_text(encoding="utf-8"))
    assert (metrics["dataset"], metrics["model"], metrics["split"]) == ("demo_cn", "ernie_vil", "test")
    assert (metrics["num_images"], metrics["num_texts"]) == (100, 500)
    assert set(metrics["stages"]) == {"zeroshot", "finetuned"}

    gold_t2i: dict[int, set[int]] = {}
    for line in (workflow.workdir / "resources/demo_cn/lmdb/test/texts.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        gold_t2i[record["text_id"]] = set(record["image_ids"])
    gold_i2t: dict[int, set[int]] = {}
    for text_id, image_ids in gold_t2i.items():
        for image_id in image_ids:
            gold_i2t.setdefault(image_id, set()).add(text_id)

    for stage, scores in metrics["stages"].items():
        t2i = {}
        for line in (result / stage / "t2i_predictions.jsonl").read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            assert len(record["image_ids"]) == 10 == len(set(record["image_ids"]))
            t2i[record["text_id"]] = record["image_ids"]
        i2t = {}
        for line in (result / stage / "i2t_predictions.jsonl").read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            assert len(record["text_ids"]) == 10 == len(set(record["text_ids"]))
            i2t[record["image_id"]] = record["text_ids"]
        # metrics.json must agree with an independent recount from the prediction files
        for direction, predictions, gold in (("text_to_image", t2i, gold_t2i), ("image_to_text", i2t, gold_i2t)):
            for k in (1, 5, 10):
                assert scores[direction][f"r{k}"] == pytest.approx(_brute_force_recall(predictions, gold, k))
            expected_mean = sum(scores[direction][f"r{k}"] for k in (1, 5, 10)) / 3
            assert scores[direction]["mean_recall"] == pytest.approx(expected_mean)
        assert scores["mean_recall"] == pytest.approx(
            (scores["text_to_image"]["mean_recall"] + scores["image_to_text"]["mean_recall"]) / 2
        )

    zeroshot = metrics["stages"]["zeroshot"]["mean_recall"]
    finetuned = metrics["stages"]["finetuned"]["mean_recall"]
    assert finetuned >= 40, metrics
    assert finetuned >= 3 * zeroshot, metrics

    steps = [json.loads(line) for line in (workflow.workdir / "work/demo_cn/ernie_vil/train_log.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in steps if row.get("event") == "train"]
    assert len(losses) > 40 and all(loss == loss for loss in losses)  # no NaN
    assert sum(losses[-20:]) / 20 < sum(losses[:20]) / 20 - 1.0

    # Tracking: the pair's runs in the SQLite store carry exactly the metrics.json values.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workflow.workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("vlretrieval")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(run.data.tags["stage"] for run in runs) == ["finetune", "finetuned", "pair", "zeroshot"]
    for run in runs:
        stage = run.data.tags["stage"]
        if stage in metrics["stages"]:
            scores = metrics["stages"][stage]
            assert run.data.metrics["t2i_r1"] == scores["text_to_image"]["r1"]
            assert run.data.metrics["i2t_mean_recall"] == scores["image_to_text"]["mean_recall"]
            assert run.data.metrics["mean_recall"] == scores["mean_recall"]
    finetune_run = next(run for run in runs if run.data.tags["stage"] == "finetune")
    assert len(client.get_metric_history(finetune_run.info.run_id, "train_loss")) == len(losses)

    # Re-running tracking updates the same runs.
    workflow.run("-R", "track")
    assert len(client.search_runs([experiment.experiment_id])) == 4

    # Leaderboard rows and report figures.
    summary = (workflow.workdir / "results" / "summary.csv").read_text(encoding="utf-8").splitlines()
    header = summary[0].split(",")
    rows = [dict(zip(header, line.split(","))) for line in summary[1:]]
    assert [(r["dataset"], r["model"], r["stage"]) for r in rows] == [
        ("demo_cn", "ernie_vil", "zeroshot"), ("demo_cn", "ernie_vil", "finetuned")
    ]
    for row in rows:
        assert float(row["mean_recall"]) == pytest.approx(metrics["stages"][row["stage"]]["mean_recall"], abs=1e-4)
    for figure in ("recall_at_k.png", "train_loss.png"):
        assert (workflow.workdir / "results" / "figures" / "demo_cn" / "ernie_vil" / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    workflow.run("--report", "report.html")
    html = (workflow.workdir / "report.html").read_text(encoding="utf-8", errors="replace")
    assert "recall_at_k.png" in html and "train_loss.png" in html and "summary.csv" in html
