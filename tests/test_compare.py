"""metrics.json intervals, the paired comparison of stage folders, and what the leaderboard and the
figures show of them; on a real serialized demo split with prediction files of known quality."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from vlretrieval.data.demo import DemoSpec, write_demo_archive
from vlretrieval.data.lmdb_store import SplitStore, serialize_split
from vlretrieval.errors import DataError
from vlretrieval.retrieval.compare import ComparisonError, compare_folders, figure_names, format_report
from vlretrieval.retrieval.evaluate import gold_digest, write_pair_results
from vlretrieval.retrieval.metrics import score_prediction_files
from vlretrieval.retrieval.predictions import invert_gold, read_gold_t2i, write_predictions
from vlretrieval.tracking.leaderboard import COLUMNS, find_metrics, leaderboard_rows, write_leaderboard
from vlretrieval.tracking.plots import recall_curves

REPO = Path(__file__).resolve().parent.parent
RESAMPLES = 1000


def ranked_predictions(rng, queries, gallery, gold, hit_rate: float) -> np.ndarray:
    """Top 10 per query: random non-gold items, with a gold item at a random rank for ``hit_rate`` of them."""
    gallery = np.asarray(gallery)
    rows = []
    for query in queries:
        relevant = gold.get(query, set())
        others = gallery[~np.isin(gallery, list(relevant))]
        row = rng.choice(others, 10, replace=False)
        if relevant and rng.random() < hit_rate:
            row[rng.integers(0, 10)] = min(relevant)
        rows.append(row)
    return np.array(rows, dtype=np.int64)


def write_stage(out: Path, split_dir: Path, hit_rate: float, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    gold = read_gold_t2i(split_dir / "texts.jsonl")
    with SplitStore(split_dir) as store:
        images, texts = store.image_ids(), [record.text_id for record in store.texts()]
    out.mkdir(parents=True)
    write_predictions(out / "t2i_predictions.jsonl", "text_to_image", np.array(texts),
                      ranked_predictions(rng, texts, images, gold, hit_rate))
    write_predictions(out / "i2t_predictions.jsonl", "image_to_text", np.array(images),
                      ranked_predictions(rng, images, texts, invert_gold(gold), hit_rate))
    return out


def score(root: Path, split_dir: Path, stages: dict[str, Path], *, dataset="demo_st", model="m1", seed=0) -> Path:
    out = root / "results" / dataset / model
    write_pair_results(out, dataset=dataset, model=model, split="test", split_dir=split_dir,
                       stage_predictions=stages, k=10, resamples=RESAMPLES, seed=seed)
    return out


@pytest.fixture(scope="module")
def scored(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("compare")
    write_demo_archive(DemoSpec(name="demo_st", seed=2, sizes={"test": 40}), root / "demo.zip")
    zipfile.ZipFile(root / "demo.zip").extractall(root / "dl")
    split_dir = root / "lmdb" / "test"
    serialize_split("raw_tsv", root / "dl", "test", split_dir, entry={"format": "raw_tsv", "root": "demo_st"},
                    progress=False, workers=1)
    weak = write_stage(root / "work" / "weak", split_dir, 0.2, seed=1)
    strong = write_stage(root / "work" / "strong", split_dir, 0.9, seed=2)
    middle = write_stage(root / "work" / "middle", split_dir, 0.85, seed=3)
    pair = score(root, split_dir, {"zeroshot": weak, "finetuned": strong})
    other = score(root, split_dir, {"zeroshot": weak, "finetuned": middle}, model="m2")
    return {"root": root, "split": split_dir, "pair": pair, "other": other, "weak": weak, "strong": strong}


def test_metrics_json_carries_intervals_and_keeps_its_values(scored):
    metrics = json.loads((scored["pair"] / "metrics.json").read_text(encoding="utf-8"))
    gold = read_gold_t2i(scored["split"] / "texts.jsonl")
    assert metrics["gold"] == {"file": "gold.jsonl", "sha256": gold_digest(gold)}
    assert read_gold_t2i(scored["pair"] / "gold.jsonl") == gold
    assert metrics["bootstrap"]["resamples"] == RESAMPLES and metrics["bootstrap"]["seed"] == 0
    for stage, folder in (("zeroshot", scored["weak"]), ("finetuned", scored["strong"])):
        block = metrics["stages"][stage]
        unchanged = score_prediction_files(scored["split"] / "texts.jsonl", folder / "t2i_predictions.jsonl",
                                           folder / "i2t_predictions.jsonl", k=10, allow_extra_queries=True)
        for direction, queries in (("text_to_image", 200), ("image_to_text", 40)):
            assert {k: block[direction][k] for k in ("r1", "r5", "r10", "mean_recall")} == unchanged[direction]
            assert block[direction]["queries"] == queries
            assert list(block[direction]["ci95"]) == ["r1", "r5", "r10", "mean_recall"]
            for name, (low, high) in block[direction]["ci95"].items():
                assert low <= block[direction][name] <= high, (stage, direction, name)
                # Every resample of an all-miss (or all-hit) figure is the same: a zero-width interval.
                assert (low < high) == (0 < block[direction][name] < 100), (stage, direction, name)
        assert block["mean_recall"] == unchanged["mean_recall"]
        low, high = block["ci95_mean_recall"]
        assert low < block["mean_recall"] < high


def test_rescoring_with_the_same_seed_gives_the_same_file(scored, tmp_path):
    again = score(tmp_path, scored["split"], {"zeroshot": scored["weak"], "finetuned": scored["strong"]})
    assert (again / "metrics.json").read_bytes() == (scored["pair"] / "metrics.json").read_bytes()
    other_seed = score(tmp_path / "s", scored["split"], {"zeroshot": scored["weak"], "finetuned": scored["strong"]},
                       seed=1)
    first, second = (json.loads((p / "metrics.json").read_text()) for p in (scored["pair"], other_seed))
    assert first["stages"]["finetuned"]["mean_recall"] == second["stages"]["finetuned"]["mean_recall"]
    assert first["stages"]["finetuned"]["ci95_mean_recall"] != second["stages"]["finetuned"]["ci95_mean_recall"]


def test_a_folder_compared_with_itself_differs_by_zero_with_p_one(scored):
    folder = scored["pair"] / "finetuned"
    report = compare_folders(folder, folder, resamples=RESAMPLES, seed=0)
    assert list(report["metrics"]) == figure_names()
    for figure, row in report["metrics"].items():
        assert row["a"] == row["b"] and row["diff"] == 0.0, figure
        assert row["p_value"] == 1.0 and row["ci95"] == [0.0, 0.0], figure


def test_clearly_different_predictions_get_p_below_one_percent(scored):
    report = compare_folders(scored["pair"] / "zeroshot", scored["pair"] / "finetuned", resamples=RESAMPLES, seed=0)
    metrics = json.loads((scored["pair"] / "metrics.json").read_text())["stages"]
    row = report["metrics"]["mean_recall"]
    assert (row["a"], row["b"]) == (metrics["zeroshot"]["mean_recall"], metrics["finetuned"]["mean_recall"])
    assert row["diff"] == row["b"] - row["a"] > 20
    assert row["p_value"] < 0.01
    assert 0 < row["ci95"][0] < row["diff"] < row["ci95"][1]
    assert report["metrics"]["text_to_image.r10"]["p_value"] < 0.01
    text = format_report(report)
    assert "mean_recall" in text and "sign-flip permutation" in text


def _copy_pair(scored, tmp_path, dataset="demo_st", model="copy") -> Path:
    target = tmp_path / "results" / dataset / model
    shutil.copytree(scored["pair"], target)
    metrics = json.loads((target / "metrics.json").read_text())
    metrics.update(dataset=dataset, model=model)
    (target / "metrics.json").write_text(json.dumps(metrics))
    return target


def test_different_datasets_are_refused(scored, tmp_path):
    other = _copy_pair(scored, tmp_path, dataset="demo_other")
    with pytest.raises(ComparisonError, match="different datasets: 'demo_st' in A, 'demo_other' in B"):
        compare_folders(scored["pair"] / "finetuned", other / "finetuned", resamples=100, seed=0)


def _split_with_edited_gold(scored, tmp_path, edit) -> Path:
    split = tmp_path / "split"
    shutil.copytree(scored["split"], split)
    lines = [json.loads(line) for line in (split / "texts.jsonl").read_text(encoding="utf-8").splitlines()]
    (split / "texts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in edit(lines)), encoding="utf-8")
    return split


def test_gold_missing_a_text_is_refused_naming_it(scored, tmp_path):
    first_text = json.loads((scored["split"] / "texts.jsonl").read_text().splitlines()[0])["text_id"]
    split = _split_with_edited_gold(scored, tmp_path, lambda lines: lines[1:])
    edited = score(tmp_path, split, {"finetuned": scored["strong"]}, model="edited")
    with pytest.raises(ComparisonError, match=f"text {first_text} in A is not in B"):
        compare_folders(scored["pair"] / "finetuned", edited / "finetuned", resamples=100, seed=0)
    with pytest.raises(ComparisonError, match=f"text {first_text} in B is not in A"):
        compare_folders(edited / "finetuned", scored["pair"] / "finetuned", resamples=100, seed=0)


def test_gold_with_other_images_is_refused_naming_the_text(scored, tmp_path):
    lines = [json.loads(line) for line in (scored["split"] / "texts.jsonl").read_text().splitlines()]
    text_id, images = lines[3]["text_id"], lines[3]["image_ids"]
    other_image = next(r["image_ids"][0] for r in lines if r["image_ids"][0] not in images)

    def swap(rows):
        rows[3]["image_ids"] = [other_image]
        return rows

    edited = score(tmp_path, _split_with_edited_gold(scored, tmp_path, swap), {"finetuned": scored["strong"]},
                   model="edited")
    with pytest.raises(ComparisonError) as refused:
        compare_folders(scored["pair"] / "finetuned", edited / "finetuned", resamples=100, seed=0)
    assert f"text {text_id} has gold images {sorted(images)} in A but [{other_image}] in B" in str(refused.value)


def test_a_tampered_gold_or_prediction_file_is_refused(scored, tmp_path):
    copy = _copy_pair(scored, tmp_path)
    lines = (copy / "gold.jsonl").read_text().splitlines()
    (copy / "gold.jsonl").write_text("\n".join(lines[1:]) + "\n")
    with pytest.raises(DataError, match="does not match the sha256"):
        compare_folders(scored["pair"] / "finetuned", copy / "finetuned", resamples=100, seed=0)

    copy = _copy_pair(scored, tmp_path / "second")
    shutil.copyfile(scored["weak"] / "t2i_predictions.jsonl", copy / "finetuned" / "t2i_predictions.jsonl")
    with pytest.raises(DataError, match="recounted from the predictions"):
        compare_folders(scored["pair"] / "finetuned", copy / "finetuned", resamples=100, seed=0)

    copy = _copy_pair(scored, tmp_path / "third")
    missing = (copy / "finetuned" / "i2t_predictions.jsonl").read_text().splitlines()
    (copy / "finetuned" / "i2t_predictions.jsonl").write_text("\n".join(missing[1:]) + "\n")
    first_image = json.loads(missing[0])["image_id"]
    with pytest.raises(DataError, match=f"image_id: {first_image}"):
        compare_folders(scored["pair"] / "finetuned", copy / "finetuned", resamples=100, seed=0)


def test_command_line_compare_writes_json_and_refuses_with_a_message(scored, tmp_path):
    out = tmp_path / "compare.json"
    done = subprocess.run(
        [sys.executable, "-m", "vlretrieval", "compare", str(scored["pair"] / "zeroshot"),
         str(scored["pair"] / "finetuned"), "--json", str(out), "--resamples", "500", "--seed", "3"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert list(report["metrics"]) == figure_names()
    assert set(report["metrics"]["mean_recall"]) == {"a", "b", "diff", "ci95", "p_value"}
    assert report["metrics"]["mean_recall"]["p_value"] == pytest.approx(1 / 501)
    assert report["method"]["resamples"] == 500
    assert "text_to_image.r1" in done.stdout

    other = _copy_pair(scored, tmp_path, dataset="demo_other")
    refused = subprocess.run(
        [sys.executable, "-m", "vlretrieval", "compare", str(scored["pair"] / "zeroshot"), str(other / "zeroshot")],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1
    assert "different datasets" in refused.stderr


def test_leaderboard_shows_intervals_and_tests_against_the_best_row(scored, tmp_path):
    rows = leaderboard_rows(find_metrics(scored["root"] / "results"), [], resamples=RESAMPLES, seed=0)
    by_key = {(r["model"], r["stage"]): r for r in rows}
    assert by_key[("m1", "finetuned")]["best"] and not by_key[("m2", "finetuned")]["best"]
    metrics = json.loads((scored["pair"] / "metrics.json").read_text())["stages"]["finetuned"]
    assert [by_key[("m1", "finetuned")][f"mean_recall_ci_{end}"] for end in ("low", "high")] == metrics["ci95_mean_recall"]
    assert by_key[("m1", "finetuned")]["t2i_r5_ci_low"] == metrics["text_to_image"]["ci95"]["r5"][0]
    expected = compare_folders(scored["other"] / "finetuned", scored["pair"] / "finetuned", resamples=RESAMPLES, seed=0)
    assert by_key[("m2", "finetuned")]["vs_best_p"] == expected["metrics"]["mean_recall"]["p_value"]
    # Both zero-shot rows score the same predictions: equal, so p = 1 against whichever is best.
    assert {by_key[("m1", "zeroshot")]["vs_best_p"], by_key[("m2", "zeroshot")]["vs_best_p"]} == {None, 1.0}

    write_leaderboard(rows, tmp_path / "summary.csv", tmp_path / "summary.md")
    header = (tmp_path / "summary.csv").read_text().splitlines()[0].split(",")
    assert header == COLUMNS and {"mean_recall_ci_low", "mean_recall_ci_high", "vs_best_p"} <= set(header)
    markdown = (tmp_path / "summary.md").read_text()
    low, high = metrics["ci95_mean_recall"]
    assert f"{metrics['mean_recall']:.2f} [{low:.1f}, {high:.1f}]" in markdown
    assert "| best |" in markdown


def test_leaderboard_marks_a_significantly_worse_row(scored, tmp_path):
    results = tmp_path / "results"
    shutil.copytree(scored["pair"], results / "demo_st" / "m1")
    weak_as_finetuned = score(tmp_path, scored["split"], {"finetuned": scored["weak"]}, model="m3")
    assert weak_as_finetuned.parent == results / "demo_st"
    rows = leaderboard_rows(find_metrics(results), [], resamples=RESAMPLES, seed=0)
    worse = next(r for r in rows if r["model"] == "m3")
    assert worse["vs_best_p"] < 0.05
    write_leaderboard(rows, tmp_path / "summary.csv", tmp_path / "summary.md")
    assert f"| {worse['vs_best_p']:.3f} * |" in (tmp_path / "summary.md").read_text()


def test_recall_figure_bands_hold_the_curves_and_the_metrics_intervals(scored):
    curves = recall_curves(scored["pair"], scored["split"] / "texts.jsonl", resamples=RESAMPLES, seed=0)
    metrics = json.loads((scored["pair"] / "metrics.json").read_text())["stages"]
    for direction, stages in curves.items():
        for stage, curve in stages.items():
            for k, (value, low, high) in enumerate(zip(curve["recall"], curve["ci95_low"], curve["ci95_high"]), 1):
                assert low <= value <= high
                if k in (1, 5, 10):
                    assert value == metrics[stage][direction][f"r{k}"]
                    assert [low, high] == pytest.approx(metrics[stage][direction]["ci95"][f"r{k}"])
