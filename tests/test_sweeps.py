"""Sweeps: the planned DAG of the demo sweep, the summary over seeds, and the sweep's MLflow parent run
on a real SQLite store."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from vlretrieval.errors import DataError
from vlretrieval.tracking.mlflow_tracking import track_pair
from vlretrieval.tracking.sweeps import (
    COLUMNS,
    load_sweep,
    read_member_metrics,
    spread,
    sweep_metrics,
    track_sweep,
    write_summary,
)

from .test_workflow import _job_counts

# Fine-tuned mean recall per seed: mean 63, sample std sqrt((9 + 1 + 16) / 2) = sqrt(13).
FINETUNED = {1: 60.0, 2: 62.0, 3: 67.0}
ZEROSHOT = {1: 4.0, 2: 4.0, 3: 5.5}


def stage_block(mean_recall: float, intervals: bool) -> dict:
    block = {"mean_recall": mean_recall}
    for direction, shift in (("text_to_image", 2.0), ("image_to_text", -2.0)):
        recall = {"r1": mean_recall + shift - 20, "r5": mean_recall + shift, "r10": mean_recall + shift + 20,
                  "mean_recall": mean_recall + shift}
        if intervals:
            recall["queries"] = 500 if direction == "text_to_image" else 100
            recall["ci95"] = {key: [value - 1.5, value + 1.5] for key, value in recall.items() if key != "queries"}
        block[direction] = recall
    if intervals:
        block["ci95_mean_recall"] = [mean_recall - 1.9, mean_recall + 1.9]
    return block


def write_member(root: Path, member: dict, finetuned: float, zeroshot: float, *, intervals: bool) -> None:
    """A member's results folder as the score rule writes it (intervals as the scorer adds them)."""
    results = root / member["results"]
    stages = {"zeroshot": stage_block(zeroshot, intervals), "finetuned": stage_block(finetuned, intervals)}
    for stage in stages:
        (results / stage).mkdir(parents=True)
        (results / stage / "t2i_predictions.jsonl").write_text(
            json.dumps({"text_id": 1, "image_ids": [1, 2]}) + "\n", encoding="utf-8")
        (results / stage / "i2t_predictions.jsonl").write_text(
            json.dumps({"image_id": 1, "text_ids": [1, 2]}) + "\n", encoding="utf-8")
    metrics = {"dataset": member["dataset"], "model": member["model"], "split": "test", "num_texts": 500,
               "num_images": 100, "k": 10, "stages": stages}
    (results / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")


def make_plan(root: Path, name: str = "demo_seeds", seeds=(1, 2, 3), grid: dict | None = None) -> dict:
    """A plan shaped like Pipeline.sweep_plan, with absolute folders under ``root``."""
    points = [None] if not grid else list(range(len(next(iter(grid.values())))))
    members = []
    for point in points:
        for seed in seeds:
            model = f"ernie_vil__{name}__" + ("" if point is None else f"g{point}_") + f"s{seed}"
            members.append({
                "sweep": name, "dataset": "demo_cn", "model": model, "base_model": "ernie_vil",
                "configuration": "demo_cn/ernie_vil" + ("" if point is None else f"/g{point}"), "point": point,
                "overrides": {} if point is None else {key: values[point] for key, values in grid.items()},
                "seed": seed, "results": str(root / "results" / "demo_cn" / model),
                "tracking": str(root / "work" / "demo_cn" / model / "tracking.json"),
            })
    return {"name": name, "description": "seed spread", "pairs": ["demo_cn/ernie_vil"], "seeds": list(seeds),
            "grid": grid or {}, "members": members}


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


# --------------------------------------------------------------------------------------------------
# The planned DAG
# --------------------------------------------------------------------------------------------------


def test_the_demo_sweep_plans_three_finetunings_and_the_summary(workflow):
    counts = _job_counts(workflow.run("results/sweeps/demo_seeds/", "-n", "--quiet", "rules").stdout)
    # Three members of the demo pair, each through every rule of a pair in folders of its own, sharing
    # the dataset's archive, download and serialized splits; then the sweep's MLflow run and summary.
    assert counts == {
        "demo_archive": 1, "download": 1, "serialize": 2, "prepare_model": 3, "finetune": 3,
        "export_stage": 6, "extract_features": 6, "rank": 6, "score": 3, "track": 3,
        "track_sweep": 1, "sweep_summary": 1,
    }
    shell = workflow.run("results/sweeps/demo_seeds/", "-n", "-p").stdout
    for seed in (1, 2, 3):
        member = f"ernie_vil__demo_seeds__s{seed}"
        line = next(line for line in shell.splitlines() if f"--final-dir work/demo_cn/{member}/models/finetuned" in line)
        assert f'"seed": {seed},' in line and '"learning_rate": 0.0005' in line
        assert f"--out results/demo_cn/{member} " in shell
    assert "sweep_summary.py --plan" in shell and "--out results/sweeps/demo_seeds " in shell


def test_an_unknown_sweep_target_is_named(workflow):
    proc = workflow.run("results/sweeps/nope/", "-n", check=False, timeout=600)
    assert proc.returncode != 0
    assert "unknown sweep 'nope'; known: demo_seeds" in proc.stdout + proc.stderr


# --------------------------------------------------------------------------------------------------
# The summary
# --------------------------------------------------------------------------------------------------


def test_spread_is_the_sample_statistics():
    assert spread([60.0, 62.0, 67.0]) == {"mean": 63.0, "std": pytest.approx(math.sqrt(13)), "min": 60.0, "max": 67.0}
    assert spread([5.0]) == {"mean": 5.0, "std": None, "min": 5.0, "max": 5.0}


def test_summary_over_seeds_with_intervals_where_present(tmp_path):
    plan = make_plan(tmp_path)
    for member in plan["members"]:
        # the third member was scored before intervals existed
        write_member(tmp_path, member, FINETUNED[member["seed"]], ZEROSHOT[member["seed"]],
                     intervals=member["seed"] != 3)
    loaded = load_sweep(plan)
    write_summary(plan, loaded, tmp_path / "summary.csv", tmp_path / "summary.md",
                  tracking={"sweep_run_id": "abc123", "experiment_id": "7"})

    rows = read_csv(tmp_path / "summary.csv")
    assert tuple(rows[0]) == COLUMNS
    values = [r for r in rows if r["statistic"] == "value"]
    assert [(r["member"], r["seed"], r["stage"]) for r in values] == [
        (f"ernie_vil__demo_seeds__s{seed}", str(seed), stage) for seed in (1, 2, 3) for stage in ("zeroshot", "finetuned")]
    first = values[1]
    assert (first["configuration"], first["overrides"], first["n_seeds"]) == ("demo_cn/ernie_vil", "{}", "")
    assert float(first["mean_recall"]) == 60.0 and float(first["t2i_r1"]) == 42.0 and float(first["i2t_r10"]) == 78.0
    assert (float(first["mean_recall_ci95_lo"]), float(first["mean_recall_ci95_hi"])) == (58.1, 61.9)
    assert (float(first["t2i_r5_ci95_lo"]), float(first["t2i_r5_ci95_hi"])) == (60.5, 63.5)
    assert values[5]["mean_recall_ci95_lo"] == "" and float(values[5]["mean_recall"]) == 67.0

    stats = {(r["stage"], r["statistic"]): r for r in rows if r["statistic"] != "value"}
    assert set(stats) == {(stage, s) for stage in ("zeroshot", "finetuned") for s in ("mean", "std", "min", "max")}
    assert float(stats[("finetuned", "mean")]["mean_recall"]) == 63.0
    assert float(stats[("finetuned", "std")]["mean_recall"]) == pytest.approx(math.sqrt(13), abs=1e-4)
    assert float(stats[("finetuned", "min")]["mean_recall"]) == 60.0
    assert float(stats[("finetuned", "max")]["mean_recall"]) == 67.0
    assert float(stats[("finetuned", "mean")]["t2i_mean_recall"]) == 65.0
    assert float(stats[("zeroshot", "mean")]["mean_recall"]) == 4.5
    assert float(stats[("zeroshot", "std")]["mean_recall"]) == pytest.approx(math.sqrt(0.75), abs=1e-4)
    assert all(r["n_seeds"] == "3" and r["member"] == "" and r["mean_recall_ci95_lo"] == "" for r in stats.values())

    md = (tmp_path / "summary.md").read_text(encoding="utf-8")
    assert md.startswith("# Sweep demo_seeds\n\nseed spread\n")
    assert "| finetuned | 45.00 ± 3.61 (42.00–49.00) |" in md  # T2I R@1 over seeds
    assert "63.00 ± 3.61 (60.00–67.00) |" in md
    assert "| ernie_vil__demo_seeds__s1 | 1 | finetuned | 42.00 [40.50, 43.50] |" in md
    assert "| 60.00 [58.10, 61.90] |" in md
    assert "| ernie_vil__demo_seeds__s3 | 3 | finetuned | 49.00 | " in md
    assert "parent run abc123 (experiment id 7)" in md


def test_a_grid_is_summarised_per_configuration(tmp_path):
    plan = make_plan(tmp_path, name="lr", seeds=(1, 2), grid={"train.learning_rate": [1.0e-4, 5.0e-4]})
    for member in plan["members"]:
        finetuned = (50.0 if member["point"] == 0 else 70.0) + member["seed"]
        write_member(tmp_path, member, finetuned, 3.0, intervals=False)
    loaded = load_sweep(plan)
    write_summary(plan, loaded, tmp_path / "summary.csv", tmp_path / "summary.md")
    rows = read_csv(tmp_path / "summary.csv")
    means = {r["configuration"]: r for r in rows if r["statistic"] == "mean" and r["stage"] == "finetuned"}
    assert float(means["demo_cn/ernie_vil/g0"]["mean_recall"]) == 51.5
    assert float(means["demo_cn/ernie_vil/g1"]["mean_recall"]) == 71.5
    assert json.loads(means["demo_cn/ernie_vil/g1"]["overrides"]) == {"train.learning_rate": 5.0e-4}
    assert "## demo_cn/ernie_vil/g1: train.learning_rate=0.0005" in (tmp_path / "summary.md").read_text(encoding="utf-8")
    metrics = sweep_metrics(loaded)
    assert metrics["demo_cn/ernie_vil/g0/finetuned_mean_recall_mean"] == 51.5
    assert metrics["demo_cn/ernie_vil/g1/finetuned_mean_recall_std"] == pytest.approx(math.sqrt(0.5))
    assert metrics["members"] == 4.0


def test_a_member_result_that_does_not_fit_is_named(tmp_path):
    plan = make_plan(tmp_path, seeds=(1,))
    member = plan["members"][0]
    with pytest.raises(DataError, match="metrics file not found"):
        load_sweep(plan)
    write_member(tmp_path, member, 60.0, 4.0, intervals=True)
    path = Path(member["results"]) / "metrics.json"
    with pytest.raises(DataError, match="model is 'ernie_vil__demo_seeds__s1' but the pair being read is demo_cn/other"):
        read_member_metrics(path, dataset="demo_cn", model="other")
    document = json.loads(path.read_text(encoding="utf-8"))
    document["stages"]["finetuned"]["ci95_mean_recall"] = [62.0, 58.0]
    path.write_text(json.dumps(document), encoding="utf-8")
    with pytest.raises(DataError, match=r"stage=finetuned.*ci95_mean_recall has its low end 62.0 above"):
        load_sweep(plan)


# --------------------------------------------------------------------------------------------------
# MLflow: the sweep's parent run on a real SQLite store
# --------------------------------------------------------------------------------------------------


def track_members(root: Path, plan: dict, uri: str) -> list[dict]:
    """Each member tracked as the track rule does it, with its sweep tags; returns the records."""
    records = []
    for member in plan["members"]:
        records.append(track_pair(
            tracking_uri=uri, experiment="sweeps-test", dataset=member["dataset"], model=member["model"],
            results_dir=Path(member["results"]), params={"train": {"seed": member["seed"]}},
            config_hash=f"cfg-{member['model']}", git_commit="42af0a2", dataset_checksum="ab" * 32,
            train_log=None, validation_report=None, artifact_files=[],
            extra_tags={"sweep": plan["name"], "sweep_configuration": member["configuration"],
                        "seed": str(member["seed"]), "base_model": member["base_model"]},
        ))
    return records


def test_the_sweep_parent_nests_its_members_and_carries_the_spread(tmp_path):
    from mlflow import MlflowClient

    plan = make_plan(tmp_path)
    for member in plan["members"]:
        write_member(tmp_path, member, FINETUNED[member["seed"]], ZEROSHOT[member["seed"]], intervals=True)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    records = track_members(tmp_path, plan, uri)
    first = track_sweep(tracking_uri=uri, experiment="sweeps-test", plan=plan, member_records=records,
                        config_hash="sweep1", git_commit="42af0a2")

    client = MlflowClient(uri)
    runs = {run.info.run_id: run for run in client.search_runs([first["experiment_id"]])}
    assert len(runs) == 1 + 3 * 3  # the sweep, and per member its pair run with two stage runs
    parent = runs[first["sweep_run_id"]]
    assert parent.info.run_name == "sweep · demo_seeds" and parent.info.status == "FINISHED"
    # The sweep spans its members' runs.
    member_runs = [runs[record["parent_run_id"]].info for record in records]
    assert parent.info.start_time == min(info.start_time for info in member_runs)
    assert parent.info.end_time == max(info.end_time for info in member_runs)
    assert {k: parent.data.tags[k] for k in ("sweep", "stage", "config_hash", "git_commit")} == {
        "sweep": "demo_seeds", "stage": "sweep", "config_hash": "sweep1", "git_commit": "42af0a2"}
    assert "mlflow.parentRunId" not in parent.data.tags
    metrics = parent.data.metrics
    assert metrics["finetuned_mean_recall_mean"] == 63.0
    assert metrics["finetuned_mean_recall_std"] == round(math.sqrt(13), 4)  # rounded as every logged figure
    assert (metrics["finetuned_mean_recall_min"], metrics["finetuned_mean_recall_max"]) == (60.0, 67.0)
    assert metrics["zeroshot_mean_recall_mean"] == 4.5 and metrics["members"] == 3.0
    # The headline a pair's parent shows, here as means over the seeds.
    assert (metrics["finetuned_mean_recall"], metrics["zeroshot_mean_recall"], metrics["mean_recall_gain"]) == (
        63.0, 4.5, 58.5)
    assert parent.data.params["sweep.seeds"] == "[1, 2, 3]"
    assert parent.data.params["sweep.pairs"] == '["demo_cn/ernie_vil"]'
    assert sorted(a.path for a in client.list_artifacts(parent.info.run_id)) == ["summary.csv", "summary.md"]

    # Each member's pair run sits under the sweep, its stage runs under the pair run as for any pair;
    # every member run carries the sweep's tags, so a search lines the members up.
    for member, record in zip(plan["members"], records):
        pair_run = runs[record["parent_run_id"]]
        assert pair_run.data.tags["mlflow.parentRunId"] == first["sweep_run_id"]
        for run_id in record["runs"].values():
            assert runs[run_id].data.tags["mlflow.parentRunId"] == record["parent_run_id"]
    assert first["members"] == {f"demo_cn/{m['model']}": r["parent_run_id"] for m, r in zip(plan["members"], records)}
    finetuned = client.search_runs([first["experiment_id"]], "tags.sweep = 'demo_seeds' and tags.stage = 'finetuned'")
    assert sorted((run.data.tags["seed"], run.data.metrics["mean_recall"]) for run in finetuned) == [
        ("1", 60.0), ("2", 62.0), ("3", 67.0)]

    # Re-running both steps updates the same runs and keeps the nesting.
    records = track_members(tmp_path, plan, uri)
    again = track_sweep(tracking_uri=uri, experiment="sweeps-test", plan=plan, member_records=records,
                        config_hash="sweep1", git_commit="42af0a2")
    assert again == first
    runs = {run.info.run_id: run for run in client.search_runs([first["experiment_id"]])}
    assert len(runs) == 10
    assert all(runs[r["parent_run_id"]].data.tags["mlflow.parentRunId"] == first["sweep_run_id"] for r in records)

    # Another sweep config is another parent, and the members move under it.
    changed = track_sweep(tracking_uri=uri, experiment="sweeps-test", plan=plan, member_records=records,
                          config_hash="sweep2", git_commit="42af0a2")
    assert changed["sweep_run_id"] != first["sweep_run_id"]
    assert client.get_run(records[0]["parent_run_id"]).data.tags["mlflow.parentRunId"] == changed["sweep_run_id"]


def test_sweep_tracking_checks_its_inputs_before_mlflow(tmp_path):
    plan = make_plan(tmp_path, seeds=(1, 2))
    for member in plan["members"]:
        write_member(tmp_path, member, FINETUNED[member["seed"]], 4.0, intervals=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(DataError, match="no parent_run_id; the track rule of the member writes it"):
        track_sweep(tracking_uri=uri, experiment="sweeps-test", plan=plan, member_records=[{}, {}],
                    config_hash="s", git_commit="")
    assert not (tmp_path / "mlflow.db").exists()


def test_member_tags_never_replace_what_identifies_a_pair(tmp_path):
    from vlretrieval.tracking.mlflow_tracking import TrackingError

    for key in ("model", "stage", "config_hash"):
        with pytest.raises(TrackingError, match=f"extra tag '{key}' would replace a tag that identifies"):
            track_pair(tracking_uri=f"sqlite:///{tmp_path}/m.db", experiment="e", dataset="demo_cn", model="m",
                       results_dir=tmp_path, params={}, config_hash="c", git_commit="", dataset_checksum="",
                       train_log=None, validation_report=None, artifact_files=[], extra_tags={key: "x"})


def test_leaderboard_leaves_sweep_members_to_their_summary(tmp_path):
    from vlretrieval.pipeline import member_model_name
    from vlretrieval.tracking.leaderboard import find_metrics

    plain = tmp_path / "demo_cn" / "ernie_vil" / "metrics.json"
    member = tmp_path / "demo_cn" / member_model_name("ernie_vil", "demo_seeds", None, 2) / "metrics.json"
    for path in (plain, member):
        path.parent.mkdir(parents=True)
        path.write_text("{}")
    assert find_metrics(tmp_path) == [plain]
