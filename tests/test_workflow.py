"""The workflow itself: lint, planning of the default DAG, and a real run through serialization."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from vlretrieval.data.lmdb_store import SplitStore

from .conftest import REPO, BIN, snakemake_env, tiny_demo_entry
from .test_report import check_report


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
    pairs = len(_default_grid())
    # Every demo pair: the train split for fine-tuning, the test split for evaluation (both shared by
    # the pairs), and two evaluated stages (zero-shot and fine-tuned), each exported for the inference
    # engine, extracted and ranked; then tracking, the leaderboard and the report's figures and galleries.
    assert counts == {
        "demo_archive": 1, "download": 1, "serialize": 2, "prepare_model": pairs, "finetune": pairs,
        "export_stage": 2 * pairs, "extract_features": 2 * pairs, "rank": 2 * pairs, "score": pairs,
        "track": pairs, "leaderboard": 1, "recall_curves": pairs, "loss_curve": pairs, "gallery": pairs, "all": 1,
    }


def test_real_dataset_dag_plans_download_to_recall(workflow):
    proc = workflow.run("results/flickr30k_cn/ernie_vil/", "-n", "--quiet", "rules")
    counts = _job_counts(proc.stdout)
    assert counts == {
        "download": 1, "serialize": 2, "prepare_model": 1, "finetune": 1,
        "export_stage": 2, "extract_features": 2, "rank": 2, "score": 1,
    }


def test_cross_encoder_dags_plan_from_download(workflow):
    vinvl = _job_counts(workflow.run("results/coco2014/vinvl/", "-n", "--quiet", "rules").stdout)
    assert vinvl == {"download": 1, "serialize": 2, "serialize_regions": 2, "prepare_model": 1, "finetune": 1,
                     "rerank": 2, "score": 1}
    bridgetower = _job_counts(workflow.run("results/flickr30k/bridgetower/", "-n", "--quiet", "rules").stdout)
    assert bridgetower == {"download": 1, "serialize": 2, "prepare_model": 1, "finetune": 1, "rerank": 2, "score": 1}
    # The authors' fine-tuning resolution reaches the initial model; the tiny demo model keeps its own.
    assert "--image-size 384 --out work/flickr30k/bridgetower/models/init" in workflow.run(
        "results/flickr30k/bridgetower/", "-n", "-p").stdout
    demo = workflow.run("results/demo_en/bridgetower/", "-n", "-p").stdout
    assert "prepare_model.py --family bridgetower" in demo and "--image-size" not in demo

    # Two-stage VinVL: ERNIE-ViL's fine-tuned features of the same split become a dependency.
    workflow.write_config({"grid": {"datasets": ["coco2014"], "models": ["vinvl"]}, "pair_overrides": {"coco2014": {
        "vinvl": {"eval": {"protocol": "two_stage", "candidates": {"model": "ernie_vil", "k": 20}}}}}})
    plan = workflow.run("results/coco2014/vinvl/", "-n", "--quiet", "rules")
    assert _job_counts(plan.stdout) == {
        "download": 1, "serialize": 2, "serialize_regions": 2, "prepare_model": 2, "finetune": 2,
        "export_stage": 1, "extract_features": 1, "rerank": 2, "score": 1,
    }
    shell = workflow.run("results/coco2014/vinvl/", "-n", "-p").stdout
    assert "--protocol two_stage --batch-size 256 --regions resources/coco2014/regions/test" in shell
    assert "--candidates work/coco2014/ernie_vil/finetuned/features --candidates-k 20" in shell


def test_test_only_dataset_is_evaluated_zero_shot(workflow):
    counts = _job_counts(workflow.run("results/coco_cn/ernie_vil/", "-n", "--quiet", "rules").stdout)
    assert counts == {
        "download": 1, "serialize": 1, "prepare_model": 1, "export_stage": 1, "extract_features": 1, "rank": 1, "score": 1,
    }


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


def _default_grid() -> list[tuple[str, str]]:
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text(encoding="utf-8"))
    from vlretrieval.config import configured_pairs

    return configured_pairs(config)


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _check_pair_metrics(workdir, dataset: str, model: str, *, num_images: int = 100, captions_per_image: int = 5,
                        quality_bar: bool = True) -> dict:
    """metrics.json of a pair agrees with a recount from its prediction files; returns it."""
    result = workdir / "results" / dataset / model
    metrics = json.loads((result / "metrics.json").read_text(encoding="utf-8"))
    assert (metrics["dataset"], metrics["model"], metrics["split"]) == (dataset, model, "test")
    assert (metrics["num_images"], metrics["num_texts"]) == (num_images, captions_per_image * num_images)
    assert set(metrics["stages"]) == {"zeroshot", "finetuned"}

    gold_t2i = {r["text_id"]: set(r["image_ids"]) for r in _read_jsonl(workdir / f"resources/{dataset}/lmdb/test/texts.jsonl")}
    gold_i2t: dict[int, set[int]] = {}
    for text_id, image_ids in gold_t2i.items():
        for image_id in image_ids:
            gold_i2t.setdefault(image_id, set()).add(text_id)

    for stage, scores in metrics["stages"].items():
        t2i = {r["text_id"]: r["image_ids"] for r in _read_jsonl(result / stage / "t2i_predictions.jsonl")}
        i2t = {r["image_id"]: r["text_ids"] for r in _read_jsonl(result / stage / "i2t_predictions.jsonl")}
        assert all(len(ids) == 10 == len(set(ids)) for ids in (*t2i.values(), *i2t.values()))
        # metrics.json must agree with an independent recount from the prediction files
        for direction, predictions, gold in (("text_to_image", t2i, gold_t2i), ("image_to_text", i2t, gold_i2t)):
            for k in (1, 5, 10):
                assert scores[direction][f"r{k}"] == pytest.approx(_brute_force_recall(predictions, gold, k))
            expected_mean = sum(scores[direction][f"r{k}"] for k in (1, 5, 10)) / 3
            assert scores[direction]["mean_recall"] == pytest.approx(expected_mean)
        assert scores["mean_recall"] == pytest.approx(
            (scores["text_to_image"]["mean_recall"] + scores["image_to_text"]["mean_recall"]) / 2
        )
        # Every figure carries its 95% bootstrap interval over the direction's queries.
        for direction, gold in (("text_to_image", gold_t2i), ("image_to_text", gold_i2t)):
            assert scores[direction]["queries"] == len(gold)
            for name, (low, high) in scores[direction]["ci95"].items():
                assert low <= scores[direction][name] <= high
        low, high = scores["ci95_mean_recall"]
        assert low <= scores["mean_recall"] <= high

    if quality_bar:
        zeroshot = metrics["stages"]["zeroshot"]["mean_recall"]
        finetuned = metrics["stages"]["finetuned"]["mean_recall"]
        assert finetuned >= 40, metrics
        assert finetuned >= 3 * zeroshot, metrics
    return metrics


def _check_demo_predictions(workdir, dataset: str, model: str) -> None:
    """The fine-tuned model, through the similarity tool, picks test images' own captions among the
    captions of 20 test images far more often than chance (1 in 20); the ERNIE-ViL demo model gets 12."""
    from vlretrieval.data.lmdb_store import SplitStore
    from vlretrieval.retrieval.similarity import SimilarityModel, compute_similarity

    tool = SimilarityModel(workdir / f"work/{dataset}/{model}/models/finetuned")
    with SplitStore(workdir / f"resources/{dataset}/lmdb/test") as store:
        first_caption = {}
        for text in store.texts():
            first_caption.setdefault(text.image_ids[0], text.text)
        image_ids = store.image_ids()[:20]
        paths = []
        for image_id in image_ids:
            path = workdir / f"similarity_{model}_{image_id}.png"
            path.write_bytes(store.image_bytes(image_id))
            paths.append(path)
    captions = [first_caption[image_id] for image_id in image_ids]
    result = compute_similarity(tool, paths, captions)
    correct = int((result.probabilities.argmax(axis=1) == range(len(paths))).sum())
    assert correct >= 6, (model, correct)


@pytest.mark.slow
def test_demo_grid_end_to_end_meets_quality_bar(workflow):
    """The default grid, as `make demo` runs it: every demo pair from archive to recall."""
    grid = _default_grid()
    workflow.run()
    metrics = {}
    for dataset, model in grid:
        metrics[(dataset, model)] = _check_pair_metrics(workflow.workdir, dataset, model)
        _check_demo_predictions(workflow.workdir, dataset, model)

    # Tracking: each pair's runs in the SQLite store carry the metrics.json values, rounded as logged.
    from mlflow.tracking import MlflowClient

    from vlretrieval.tracking.mlflow_tracking import rounded

    client = MlflowClient(tracking_uri=f"sqlite:///{workflow.workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("vlretrieval")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 4 * len(grid)
    for dataset, model in grid:
        pair_runs = [run for run in runs if (run.data.tags["dataset"], run.data.tags["model"]) == (dataset, model)]
        assert sorted(run.data.tags["stage"] for run in pair_runs) == ["finetune", "finetuned", "pair", "zeroshot"]
        for run in pair_runs:
            stage = run.data.tags["stage"]
            if stage in metrics[(dataset, model)]["stages"]:
                scores = metrics[(dataset, model)]["stages"][stage]
                assert run.data.metrics["t2i_r1"] == rounded(scores["text_to_image"]["r1"])
                assert run.data.metrics["i2t_mean_recall"] == rounded(scores["image_to_text"]["mean_recall"])
                assert run.data.metrics["mean_recall"] == rounded(scores["mean_recall"])
                assert [run.data.metrics[f"mean_recall_ci_{end}"] for end in ("low", "high")] == [
                    rounded(end) for end in scores["ci95_mean_recall"]]
                assert run.data.metrics["t2i_r1_ci_low"] == rounded(scores["text_to_image"]["ci95"]["r1"][0])
            if stage == "pair":
                assert run.data.metrics["finetuned_mean_recall"] == rounded(
                    metrics[(dataset, model)]["stages"]["finetuned"]["mean_recall"])
        steps = _read_jsonl(workflow.workdir / f"work/{dataset}/{model}/train_log.jsonl")
        losses = [row["loss"] for row in steps if row.get("event") == "train"]
        assert len(losses) > 40 and all(loss == loss for loss in losses)  # no NaN
        assert sum(losses[-20:]) / 20 < sum(losses[:20]) / 20 - 1.0
        finetune_run = next(run for run in pair_runs if run.data.tags["stage"] == "finetune")
        assert len(client.get_metric_history(finetune_run.info.run_id, "train_loss")) == len(losses)
        # The training run lasts as long as the training did.
        [end] = [row for row in steps if row.get("event") == "end"]
        duration = (finetune_run.info.end_time - finetune_run.info.start_time) / 1000
        assert abs(duration - end["train_runtime"]) <= 0.1 * end["train_runtime"], (duration, end["train_runtime"])

    # Re-running tracking updates the same runs.
    workflow.run("-R", "track")
    assert len(client.search_runs([experiment.experiment_id])) == 4 * len(grid)

    # Leaderboard rows and report figures.
    summary = (workflow.workdir / "results" / "summary.csv").read_text(encoding="utf-8").splitlines()
    header = summary[0].split(",")
    rows = [dict(zip(header, line.split(","))) for line in summary[1:]]
    assert sorted((r["dataset"], r["model"], r["stage"]) for r in rows) == sorted(
        (d, m, stage) for d, m in grid for stage in ("zeroshot", "finetuned")
    )
    for row in rows:
        expected = metrics[(row["dataset"], row["model"])]["stages"][row["stage"]]
        assert float(row["mean_recall"]) == pytest.approx(expected["mean_recall"], abs=1e-4)
        assert [float(row[f"mean_recall_ci_{end}"]) for end in ("low", "high")] == pytest.approx(
            expected["ci95_mean_recall"], abs=1e-4)
    # One best row per dataset, split and stage; every other row has a paired p-value against it.
    for dataset in {d for d, _ in grid}:
        for stage in ("zeroshot", "finetuned"):
            group = [r for r in rows if (r["dataset"], r["stage"]) == (dataset, stage)]
            assert sum(r["vs_best_p"] == "" for r in group) == 1
            assert all(0 < float(r["vs_best_p"]) <= 1 for r in group if r["vs_best_p"] != "")
    dataset, model = grid[0]
    compared = workflow.workdir / "compare.json"
    subprocess.run([sys.executable, "-m", "vlretrieval", "compare", f"results/{dataset}/{model}/zeroshot",
                    f"results/{dataset}/{model}/finetuned", "--json", str(compared)],
                   cwd=workflow.workdir, env={**os.environ, "PYTHONPATH": str(REPO)}, check=True, timeout=300)
    mean_recall = json.loads(compared.read_text())["metrics"]["mean_recall"]
    assert mean_recall["diff"] > 0 and mean_recall["p_value"] < 0.01
    for dataset, model in grid:
        for figure in ("recall_at_k.png", "train_loss.png"):
            assert (workflow.workdir / "results" / "figures" / dataset / model / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    workflow.run("--report", "report.html")
    html = (workflow.workdir / "report.html").read_text(encoding="utf-8", errors="replace")
    assert "recall_at_k.png" in html and "train_loss.png" in html and "summary.csv" in html
    # The leaderboard as a table and a gallery per pair, matching metrics.json and the prediction files.
    check_report(workflow.workdir / "report.html", workflow.workdir, grid)


@pytest.mark.slow
def test_cross_encoders_run_end_to_end_with_their_protocols(workflow):
    """VinVL (regions, exhaustive) and BridgeTower (own ITC top k, ITM re-scored) on a small English
    demo, through the same rules as the dual encoders: fine-tuning on two ranks, ranking, scoring,
    tracking."""
    name = "demo_xe"
    entry = tiny_demo_entry({"train": 120, "test": 24}, name=name)
    entry["language"] = "en"
    entry["generator"].update(caption_language="en", regions=True)
    entry["regions"] = {"features": "{split}_features.tsv", "predictions": "{split}_predictions.tsv"}
    recipe = {"learning_rate": 5.0e-4, "warmup_steps": 5, "per_device_train_batch_size": 16, "num_train_epochs": 2,
              "weight_decay": 0.01, "hflip": False, "recompute": False, "save_steps": 1000, "train_max_len": 48,
              "crop_scale": None, "randaugment": None, "gradient_accumulation_steps": 1}
    workflow.write_config(
        {"grid": {"datasets": [name], "models": ["vinvl"], "pairs": [f"{name}/bridgetower"]},
         "pair_overrides": {name: {
             "*": {"init": "tiny", "image_size": None, "train": recipe},
             "vinvl": {"pretrain": {"steps": 8, "batch_size": 16, "max_len": 48},
                       "eval": {"max_len": 48, "protocol": "exhaustive"}},
             "bridgetower": {"eval": {"candidates": {"head": "itc", "k": 12}}},
         }}},
        datasets={name: entry},
    )
    counts = _job_counts(workflow.run("-n", "--quiet", "rules").stdout)
    assert counts["rerank"] == 4 and counts["serialize_regions"] == 2 and counts["finetune"] == 2
    assert "extract_features" not in counts and "rank" not in counts
    workflow.run()

    vinvl = _check_pair_metrics(workflow.workdir, name, "vinvl", num_images=24, quality_bar=False)
    assert vinvl["protocol"] == {"name": "exhaustive", "score": "cross-encoder ITM match log-odds", "top_k": 10}
    bridgetower = _check_pair_metrics(workflow.workdir, name, "bridgetower", num_images=24, quality_bar=False)
    assert bridgetower["protocol"]["name"] == "two_stage"
    assert bridgetower["protocol"]["candidates"] == {"head": "itc", "k": 12}

    for model, protocol in (("vinvl", "exhaustive"), ("bridgetower", "two_stage")):
        for stage in ("zeroshot", "finetuned"):
            log = (workflow.workdir / f"logs/rerank/{name}/{model}/{stage}.log").read_text(encoding="utf-8")
            ranking = json.loads(log.strip().splitlines()[-1])["ranking"]
            assert ranking["protocol"] == protocol
            if protocol == "exhaustive":
                assert ranking["pairs_scored"] == 24 * 120
            else:
                # the union of 120 texts x 12 and 24 images x 12 candidates, each pair once
                assert 120 * 12 <= ranking["pairs_scored"] <= 120 * 12 + 24 * 12
        steps = [row for row in _read_jsonl(workflow.workdir / f"work/{name}/{model}/train_log.jsonl")
                 if row.get("event") == "train"]
        losses = [row["loss"] for row in steps]
        assert len(losses) == 2 * (120 * 5 // 32) and all(loss == loss for loss in losses)
        assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
        if model == "bridgetower":
            # Its loss is ITC + ITM, each averaged over the two ranks as the total is.
            for row in steps:
                assert set(row["loss_parts"]) == {"itc", "itm"}
                assert row["loss_parts"]["itc"] + row["loss_parts"]["itm"] == pytest.approx(row["loss"], rel=1e-5)
            assert 0.0 < steps[0]["loss_parts"]["itm"] < 1.0 < steps[0]["loss_parts"]["itc"]
        else:
            assert all("loss_parts" not in row for row in steps)
    summary = (workflow.workdir / "results" / "summary.csv").read_text(encoding="utf-8")
    assert f"{name},vinvl,finetuned" in summary and f"{name},bridgetower,finetuned" in summary
    # Cross encoders' rankings in the galleries too, here from the zip form of the report.
    workflow.run("--report", "report.zip")
    check_report(workflow.workdir / "report.zip", workflow.workdir, [(name, "vinvl"), (name, "bridgetower")])

    # VinVL's initial model was pretrained on the training split first; BridgeTower kept its recipe's
    # learning-rate multipliers under the pair override.
    init_info = json.loads((workflow.workdir / f"work/{name}/vinvl/models/init/vlretrieval_model.json").read_text())
    assert init_info["pretrain"]["examples"] == 8 * 16 and init_info["pretrain"]["max_len"] == 48
    assert "pretrain step 8/8: masked-token loss" in (
        workflow.workdir / f"logs/prepare_model/{name}/vinvl.log").read_text(encoding="utf-8")
    start = next(row for row in _read_jsonl(workflow.workdir / f"work/{name}/bridgetower/train_log.jsonl")
                 if row.get("event") == "start")
    assert start["hparams"]["lr_multipliers"] == {"cross_modal": 5.0, "heads": 5.0}
