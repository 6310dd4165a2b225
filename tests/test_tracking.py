"""MLflow tracking of a pair: real SQLite stores, parallel writers, a real tracking server."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from vlretrieval.errors import DataError
from vlretrieval.tracking.mlflow_tracking import (
    EVAL_INTERVAL_KEYS,
    EVAL_METRIC_KEYS,
    MAX_PARAM_VALUE_LENGTH,
    TrackingError,
    flatten_params,
    read_stage_metrics,
    resolve_tracking_uri,
    track_pair,
)

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
EXPERIMENT = "vlretrieval-test"
STEPS = 30

# Percentages as the scorer writes them, including values a rounding step would change, with their
# 95% intervals.
STAGE_METRICS = {
    "zeroshot": {
        "text_to_image": {"r1": 1.0, "r5": 5.0, "r10": 10.0, "mean_recall": 5.333333333333334, "queries": 500,
                          "ci95": {"r1": [0.2, 2.0], "r5": [3.2, 7.0], "r10": [7.4, 12.8],
                                   "mean_recall": [3.8666666666666667, 6.933333333333334]}},
        "image_to_text": {"r1": 1.0, "r5": 5.0, "r10": 6.0, "mean_recall": 4.0, "queries": 100,
                          "ci95": {"r1": [0.0, 3.0], "r5": [1.0, 10.0], "r10": [2.0, 11.0],
                                   "mean_recall": [1.3333333333333333, 7.333333333333333]}},
        "mean_recall": 4.666666666666667,
        "ci95_mean_recall": [2.8833333333333333, 6.683333333333334],
    },
    "finetuned": {
        "text_to_image": {"r1": 22.8, "r5": 83.6, "r10": 96.8, "mean_recall": 67.73333333333333, "queries": 500,
                          "ci95": {"r1": [19.2, 26.4], "r5": [80.4, 86.8], "r10": [95.2, 98.2],
                                   "mean_recall": [65.8, 69.6]}},
        "image_to_text": {"r1": 25.0, "r5": 56.99999999999999, "r10": 82.0, "mean_recall": 54.666666666666664,
                          "queries": 100,
                          "ci95": {"r1": [17.0, 34.0], "r5": [47.0, 67.0], "r10": [74.0, 89.0],
                                   "mean_recall": [48.0, 61.0]}},
        "mean_recall": 61.2,
        "ci95_mean_recall": [57.8, 64.56666666666666],
    },
}
PARAMS = {
    "train": {"learning_rate": 0.0005, "max_steps": STEPS, "hflip": False, "schedule": ["cosine", 50]},
    "eval": {"max_len": 52, "k": 10},
    "model_dir": None,
}


def expected_metrics(stage_block: dict) -> dict[str, float]:
    """A stage's metrics as the run shows them: rounded to 4 decimals, as the leaderboard's CSV."""
    return {key: round(value, 4) for key, value in recorded_metrics(stage_block).items()}


def recorded_metrics(stage_block: dict) -> dict[str, float]:
    values = {}
    for direction, prefix in (("text_to_image", "t2i"), ("image_to_text", "i2t")):
        for key in ("r1", "r5", "r10", "mean_recall"):
            values[f"{prefix}_{key}"] = stage_block[direction][key]
            values[f"{prefix}_{key}_ci_low"], values[f"{prefix}_{key}_ci_high"] = stage_block[direction]["ci95"][key]
    values["mean_recall"] = stage_block["mean_recall"]
    values["mean_recall_ci_low"], values["mean_recall_ci_high"] = stage_block["ci95_mean_recall"]
    return values


def loss_at(step: int) -> float:
    return 4.2 - 0.07 * step + 1e-9 * step * step


def train_record(step: int) -> dict:
    # A loss of two parts, as BridgeTower logs it.
    return {"event": "train", "step": step, "epoch": step / 10, "loss": loss_at(step), "lr": 1e-5 * step,
            "samples_per_second": 100.0 + step, "logit_scale": 14.0 + step / 100, "time": TRAIN_START + step,
            "loss_parts": {"itc": 0.75 * loss_at(step), "itm": 0.25 * loss_at(step)}}


# The run facts and the resolved recipe a start record holds (vlretrieval.training.finetune run_info).
HPARAMS = {"seed": 3, "lr_scheduler_type": "cosine", "max_grad_norm": 1.0, "learning_rate": 0.0005,
           "per_device_train_batch_size": 16}
RUN_FACTS = {"world_size": 2, "per_device_batch_size": 16, "global_batch_size": 32, "gradient_accumulation_steps": 1,
             "device": "cpu", "family": "ernie_vil"}
TRAIN_START = 1795647157.0
# When each stage's extraction and ranking jobs ended (unix seconds): zero-shot before training, fine-tuned after.
STAGE_JOB_ENDS = {"zeroshot": (TRAIN_START - 60.0, TRAIN_START - 55.0), "finetuned": (TRAIN_START + 90.0, TRAIN_START + 94.0)}


def write_train_log(path: Path, steps: range, *, end: bool = True, mode: str = "w") -> None:
    with open(path, mode, encoding="utf-8") as handle:
        if mode == "w":
            handle.write(json.dumps({"event": "start", "step": 0, "time": TRAIN_START, **RUN_FACTS,
                                     "hparams": HPARAMS, "max_steps": STEPS}) + "\n")
        for step in steps:
            handle.write(json.dumps(train_record(step)) + "\n")
        if end:
            # The trainer's own runtime is a little shorter than the span of the log's records.
            handle.write(json.dumps({"event": "end", "step": steps[-1], "time": TRAIN_START + steps[-1] + 0.5,
                                     "train_runtime": steps[-1] - 0.3, "train_samples_per_second": 153.6,
                                     "mean_loss": 3.1}) + "\n")


def make_pair(root: Path, dataset: str = "demo_cn", model: str = "ernie_vil") -> dict:
    """A pair's results directory and workflow files, shaped like the evaluate and finetune rules write them."""
    results = root / "results" / dataset / model
    for stage in STAGE_METRICS:
        (results / stage).mkdir(parents=True)
        with open(results / stage / "t2i_predictions.jsonl", "w", encoding="utf-8") as handle:
            for text_id in range(5501, 5506):
                handle.write(json.dumps({"text_id": text_id, "image_ids": [1101, 1102, 1103]}) + "\n")
        with open(results / stage / "i2t_predictions.jsonl", "w", encoding="utf-8") as handle:
            for image_id in range(1101, 1104):
                handle.write(json.dumps({"image_id": image_id, "text_ids": [5501, 5502, 5503]}) + "\n")
    metrics = {"dataset": dataset, "model": model, "split": "test", "num_texts": 5, "num_images": 3, "k": 10,
               "stages": STAGE_METRICS}
    (results / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")

    work = root / "work" / dataset / model
    work.mkdir(parents=True)
    write_train_log(work / "train_log.jsonl", range(1, STEPS + 1))
    split_dir = root / "resources" / dataset / "lmdb" / "test"
    split_dir.mkdir(parents=True)
    (split_dir / "texts.jsonl").write_text(
        "".join(json.dumps({"text_id": t, "text": f"caption {t}", "image_ids": [1101]}) + "\n" for t in range(5501, 5506)),
        encoding="utf-8")
    report = split_dir / "validation_report.json"
    report.write_text(json.dumps({"kept_texts": 5, "kept_images": 3, "skipped": []}) + "\n", encoding="utf-8")
    # Each stage's extraction and ranking jobs, timed by Snakemake: wall seconds, file written at the end.
    stage_benchmarks = {}
    for stage, (extract_end, rank_end) in STAGE_JOB_ENDS.items():
        stage_benchmarks[stage] = []
        for rule, end, seconds in (("extract_features", extract_end, 2.25), ("rank", rank_end, 1.5)):
            path = root / "benchmarks" / rule / dataset / model / f"{stage}.tsv"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"s\th:m:s\tmax_rss\n{seconds}\t0:00:0{int(seconds)}\t120.3\n", encoding="utf-8")
            os.utime(path, (end, end))
            stage_benchmarks[stage].append(path)
    figures = []
    for name in ("recall_at_k.png", "train_loss.png"):
        figure = root / "results" / "figures" / dataset / model / name
        figure.parent.mkdir(parents=True, exist_ok=True)
        figure.write_bytes(b"\x89PNG\r\n\x1a\n" + name.encode())
        figures.append(figure)
    bench = root / "benchmarks" / dataset / model / "evaluate.tsv"
    bench.parent.mkdir(parents=True)
    bench.write_text("s\th:m:s\tmax_rss\n1.5\t0:00:01\t120.3\n", encoding="utf-8")
    log = root / "logs" / dataset / model / "evaluate.log"
    log.parent.mkdir(parents=True)
    log.write_text("scored 2 stages\n", encoding="utf-8")
    return {
        "experiment": EXPERIMENT, "dataset": dataset, "model": model, "results_dir": results,
        "params": PARAMS, "git_commit": "42af0a2", "dataset_checksum": "sha256:" + "ab" * 32,
        "train_log": work / "train_log.jsonl", "validation_report": report, "artifact_files": [bench, log],
        "split_dir": split_dir, "stage_benchmarks": stage_benchmarks, "figures": figures,
    }


def tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------------


def test_resolve_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri("sqlite:///mlflow.db", tmp_path) == f"sqlite:///{tmp_path}/mlflow.db"
    assert resolve_tracking_uri("sqlite:///db/m.db?timeout=30", tmp_path) == f"sqlite:///{tmp_path}/db/m.db?timeout=30"
    assert resolve_tracking_uri("sqlite:////abs/m.db", tmp_path) == "sqlite:////abs/m.db"
    assert resolve_tracking_uri("http://127.0.0.1:5000", tmp_path) == "http://127.0.0.1:5000"
    assert resolve_tracking_uri("", tmp_path) == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///other.db")
    assert resolve_tracking_uri("http://127.0.0.1:5000", tmp_path) == f"sqlite:///{tmp_path}/other.db"


def test_flatten_params():
    flat = flatten_params({**PARAMS, "notes": "x" * (MAX_PARAM_VALUE_LENGTH + 10), "empty": {}})
    assert flat["train.learning_rate"] == "0.0005"
    assert flat["train.hflip"] == "false"
    assert flat["train.schedule"] == '["cosine", 50]'
    assert flat["eval.max_len"] == "52"
    assert flat["model_dir"] == "null"
    assert flat["empty"] == "{}"
    assert len(flat["notes"]) == MAX_PARAM_VALUE_LENGTH and flat["notes"].endswith("[truncated]")
    with pytest.raises(TrackingError, match="same MLflow name"):
        flatten_params({"a": {"b": 1}, "a.b": 2})


# --------------------------------------------------------------------------------------------------
# SQLite store
# --------------------------------------------------------------------------------------------------


def test_sqlite_tracking_is_complete_and_idempotent(tmp_path):
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    pair = make_pair(tmp_path)
    results = pair["results_dir"]
    before = tree_digest(results)
    uri = f"sqlite:///{tmp_path}/store/mlflow.db"
    first = track_pair(tracking_uri=uri, config_hash="cfg1", **pair)

    client = MlflowClient(uri)
    experiment = client.get_experiment(first["experiment_id"])
    assert experiment.name == EXPERIMENT
    # The store is outside the current directory here, so its artifact root stays absolute.
    assert experiment.artifact_location == (tmp_path / "store" / "mlartifacts").as_uri()
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = {run.info.run_id: run for run in client.search_runs([first["experiment_id"]])}
    assert len(runs) == 4
    assert set(first["runs"]) == {"finetune", "zeroshot", "finetuned"}
    assert first["missing_artifacts"] == []

    parent = runs[first["parent_run_id"]]
    names = {stage: runs[run_id].info.run_name for stage, run_id in [("pair", parent.info.run_id), *first["runs"].items()]}
    assert names == {"pair": "demo_cn / ernie_vil", "finetune": "ernie_vil · train",
                     "zeroshot": "ernie_vil · eval zero-shot", "finetuned": "ernie_vil · eval fine-tuned"}
    for stage, run_id in [("pair", first["parent_run_id"]), *first["runs"].items()]:
        run = runs[run_id]
        assert run.info.status == "FINISHED"
        tags = run.data.tags
        assert {k: tags[k] for k in ("dataset", "model", "stage", "config_hash", "git_commit", "dataset_checksum")} == {
            "dataset": "demo_cn", "model": "ernie_vil", "stage": stage, "config_hash": "cfg1",
            "git_commit": "42af0a2", "dataset_checksum": pair["dataset_checksum"]}
        assert tags.get("mlflow.parentRunId") == (None if stage == "pair" else parent.info.run_id)
    # The shared config once, on the parent; the training run holds what the trainer resolved.
    assert parent.data.params == {
        "train.learning_rate": "0.0005", "train.max_steps": str(STEPS), "train.hflip": "false",
        "train.schedule": '["cosine", 50]', "eval.max_len": "52", "eval.k": "10", "model_dir": "null"}
    assert runs[first["runs"]["finetune"]].data.params == {
        "seed": "3", "lr_scheduler_type": "cosine", "max_grad_norm": "1.0", "learning_rate": "0.0005",
        "per_device_train_batch_size": "16", "world_size": "2", "per_device_batch_size": "16",
        "global_batch_size": "32", "gradient_accumulation_steps": "1", "device": "cpu", "family": "ernie_vil",
        "max_steps": str(STEPS)}
    # The headline figures of the pair, rounded as metrics.json's figures are.
    assert parent.data.metrics == {"zeroshot_mean_recall": 4.6667, "finetuned_mean_recall": 61.2,
                                   "mean_recall_gain": 56.5333}

    for stage, block in STAGE_METRICS.items():
        run = runs[first["runs"][stage]]
        assert run.data.params == {"split": "test", "num_texts": "5", "num_images": "3", "k": "10"}
        assert set(run.data.metrics) == set(EVAL_METRIC_KEYS) | set(EVAL_INTERVAL_KEYS)
        assert run.data.metrics == expected_metrics(block)
        assert sorted(a.path for a in client.list_artifacts(run.info.run_id)) == [
            "i2t_predictions.jsonl", "metrics.json", "t2i_predictions.jsonl"]
        artifact_dir = Path(urllib.parse.urlparse(run.info.artifact_uri).path)
        assert (artifact_dir / "t2i_predictions.jsonl").read_bytes() == (results / stage / "t2i_predictions.jsonl").read_bytes()
    assert runs[first["runs"]["finetuned"]].data.metrics["i2t_r5"] == 57.0  # recorded as 56.99999999999999

    finetune_id = first["runs"]["finetune"]
    loss = client.get_metric_history(finetune_id, "train_loss")
    assert sorted((m.step, m.value) for m in loss) == [(s, loss_at(s)) for s in range(1, STEPS + 1)]
    assert {m.step: m.timestamp for m in loss}[3] == int((TRAIN_START + 3) * 1000)
    lr = client.get_metric_history(finetune_id, "learning_rate")
    assert sorted((m.step, m.value) for m in lr) == [(s, 1e-5 * s) for s in range(1, STEPS + 1)]
    for part, share in (("itc", 0.75), ("itm", 0.25)):
        history = client.get_metric_history(finetune_id, f"train_loss_{part}")
        assert sorted((m.step, m.value) for m in history) == [(s, share * loss_at(s)) for s in range(1, STEPS + 1)]
    summary = client.get_run(finetune_id).data.metrics
    assert summary["train_samples_per_second"] == 153.6
    assert summary["mean_samples_per_second"] == pytest.approx(sum(100.0 + s for s in range(1, STEPS + 1)) / STEPS)
    assert [a.path for a in client.list_artifacts(finetune_id)] == ["train_log.jsonl"]

    assert sorted(a.path for a in client.list_artifacts(parent.info.run_id)) == [
        "figures", "metrics.json", "validation_report.json", "workflow"]
    assert sorted(a.path for a in client.list_artifacts(parent.info.run_id, "figures")) == [
        "figures/recall_at_k.png", "figures/train_loss.png"]
    assert sorted(a.path for a in client.list_artifacts(parent.info.run_id, "workflow")) == [
        "workflow/benchmarks", "workflow/logs"]
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "workflow/benchmarks/demo_cn/ernie_vil")] == [
        "workflow/benchmarks/demo_cn/ernie_vil/evaluate.tsv"]

    # Same inputs again: the same four runs, nothing logged twice.
    second = track_pair(tracking_uri=uri, config_hash="cfg1", **pair)
    assert second == first
    assert len(client.search_runs([first["experiment_id"]], run_view_type=ViewType.ALL)) == 4
    assert len(client.get_metric_history(finetune_id, "train_loss")) == STEPS
    assert len(client.get_metric_history(first["runs"]["finetuned"], "t2i_r1")) == 1
    assert tree_digest(results) == before

    # A resumed training appends steps and the scores change: only the new points are logged.
    pair["train_log"].write_text(pair["train_log"].read_text().rsplit('{"event": "end"', 1)[0], encoding="utf-8")
    write_train_log(pair["train_log"], range(STEPS + 1, STEPS + 6), mode="a")
    changed = json.loads((results / "metrics.json").read_text())
    changed["stages"]["finetuned"]["text_to_image"]["r1"] = 23.4
    (results / "metrics.json").write_text(json.dumps(changed), encoding="utf-8")
    third = track_pair(tracking_uri=uri, config_hash="cfg1", **pair)
    assert third == first
    assert sorted(m.step for m in client.get_metric_history(finetune_id, "train_loss")) == list(range(1, STEPS + 6))
    assert sorted(m.step for m in client.get_metric_history(finetune_id, "train_loss_itm")) == list(range(1, STEPS + 6))
    r1 = client.get_metric_history(first["runs"]["finetuned"], "t2i_r1")
    assert sorted(m.value for m in r1) == [22.8, 23.4]
    assert client.get_run(first["runs"]["finetuned"]).data.metrics["t2i_r1"] == 23.4
    assert len(client.get_metric_history(first["runs"]["zeroshot"], "t2i_r1")) == 1
    finetuned_dir = Path(urllib.parse.urlparse(client.get_run(first["runs"]["finetuned"]).info.artifact_uri).path)
    assert json.loads((finetuned_dir / "metrics.json").read_text()) == changed

    # A changed config is a new config hash, hence a new set of runs beside the old ones.
    other = track_pair(tracking_uri=uri, config_hash="cfg2", **pair)
    assert other["parent_run_id"] != first["parent_run_id"]
    assert len(client.search_runs([first["experiment_id"]])) == 8


def test_bad_inputs_fail_before_the_store_is_touched(tmp_path):
    pair = make_pair(tmp_path)
    (pair["results_dir"] / "finetuned" / "i2t_predictions.jsonl").unlink()
    uri = f"sqlite:///{tmp_path}/store/mlflow.db"
    with pytest.raises(DataError, match="finetuned"):
        track_pair(tracking_uri=uri, config_hash="cfg1", **pair)
    assert not (tmp_path / "store").exists()

    pair = make_pair(tmp_path / "parts")
    records = pair["train_log"].read_text(encoding="utf-8").splitlines()
    bad = json.loads(records[3])
    bad["loss_parts"] = {"itc": "high"}
    pair["train_log"].write_text("\n".join(records[:3] + [json.dumps(bad)] + records[4:]) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"train_log.jsonl:4: loss_parts.itc must be a number"):
        track_pair(tracking_uri=uri, config_hash="cfg1", **pair)
    assert not (tmp_path / "store").exists()

    pair = make_pair(tmp_path / "interval")
    metrics = json.loads((pair["results_dir"] / "metrics.json").read_text())
    metrics["stages"]["finetuned"]["image_to_text"]["ci95"]["r5"] = [47.0]
    (pair["results_dir"] / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    with pytest.raises(DataError, match=r"stage=finetuned\): image_to_text.ci95.r5 must be a \[low, high\] pair"):
        track_pair(tracking_uri=uri, config_hash="cfg1", **pair)
    assert not (tmp_path / "store").exists()


def test_metrics_scored_before_intervals_existed_are_read_without_them(tmp_path):
    pair = make_pair(tmp_path)
    metrics = json.loads((pair["results_dir"] / "metrics.json").read_text())
    for block in metrics["stages"].values():
        block.pop("ci95_mean_recall")
        for direction in ("text_to_image", "image_to_text"):
            block[direction].pop("ci95")
    (pair["results_dir"] / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    stages = read_stage_metrics(pair["results_dir"] / "metrics.json", dataset="demo_cn", model="ernie_vil")
    assert {stage: set(values) for stage, values in stages.items()} == {stage: set(EVAL_METRIC_KEYS) for stage in stages}


def test_sqlite_lock_errors_are_retried_per_call(tmp_path, caplog):
    import sqlite3
    import threading

    import sqlalchemy

    from vlretrieval.tracking.mlflow_tracking import _Store

    # MLflow's own sessions wait 20 s on a lock before failing; a zero busy timeout here reaches the
    # same "database is locked" error at once, so the retry loop around each call can be seen working.
    db = tmp_path / "locked.db"
    engine = sqlalchemy.create_engine(f"sqlite:///{db}", connect_args={"timeout": 0})
    with engine.begin() as conn:
        conn.execute(sqlalchemy.text("CREATE TABLE t (x INTEGER)"))

    def insert() -> int:
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text("INSERT INTO t VALUES (1)"))
        return 1

    store = _Store("http://127.0.0.1:9", retries=8, results_dir=tmp_path)
    holder = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    release = threading.Timer(0.5, holder.rollback)
    release.start()
    with caplog.at_level("INFO", logger="vlretrieval.tracking.mlflow_tracking"):
        assert store.call("insert a row", insert) == 1
    release.join()
    assert any("SQLite busy" in r.getMessage() for r in caplog.records)

    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(TrackingError, match="database is locked") as caught:
            _Store("http://127.0.0.1:9", retries=2, results_dir=tmp_path).call("insert a row", insert)
    finally:
        holder.rollback()
        holder.close()
    assert "re-running the track rule" in str(caught.value)
    engine.dispose()


CHILD = r"""
import json, sys, time
from pathlib import Path
from vlretrieval.tracking.mlflow_tracking import track_pair

spec = json.loads(Path(sys.argv[1]).read_text())
Path(spec.pop("ready")).touch()
go = Path(spec.pop("go"))
deadline = time.monotonic() + 120
while not go.exists():
    if time.monotonic() > deadline:
        sys.exit("no start signal")
    time.sleep(0.005)
for key in ("results_dir", "train_log", "validation_report", "split_dir"):
    spec[key] = Path(spec[key])
for key in ("artifact_files", "figures"):
    spec[key] = [Path(p) for p in spec[key]]
spec["stage_benchmarks"] = {stage: [Path(p) for p in paths] for stage, paths in spec["stage_benchmarks"].items()}
print(json.dumps(track_pair(**spec)))
"""


def test_parallel_jobs_share_one_new_sqlite_store(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/shared/mlflow.db"
    go = tmp_path / "go"
    procs = []
    for index, dataset in enumerate(("demo_a", "demo_b")):
        pair = make_pair(tmp_path / dataset, dataset=dataset)
        spec = dict(pair, tracking_uri=uri, config_hash="cfg1", ready=str(tmp_path / f"ready{index}"), go=str(go))
        spec_path = tmp_path / f"spec{index}.json"
        spec_path.write_text(json.dumps(spec, default=str), encoding="utf-8")
        procs.append(subprocess.Popen([sys.executable, "-c", CHILD, str(spec_path)], cwd=tmp_path,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    # Both import MLflow first, then start together, so they race on creating the schema and experiment.
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "workers did not start"
        time.sleep(0.02)
    go.touch()
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))

    assert results[0]["experiment_id"] == results[1]["experiment_id"]
    client = MlflowClient(uri)
    assert [e.name for e in client.search_experiments() if e.name == EXPERIMENT] == [EXPERIMENT]
    runs = client.search_runs([results[0]["experiment_id"]])
    assert len(runs) == 8
    assert sorted(r.data.tags["dataset"] for r in runs) == ["demo_a"] * 4 + ["demo_b"] * 4
    assert all(r.info.status == "FINISHED" for r in runs)


# --------------------------------------------------------------------------------------------------
# Tracking server
# --------------------------------------------------------------------------------------------------


class Server:
    def __init__(self, root: Path):
        self.root = root
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = root / "server.log"
        env = dict(os.environ)
        # The server's background job runner is not used here and costs a CPU during start-up.
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [str(BIN / "mlflow"), "server",
                 "--backend-store-uri", f"sqlite:///{root}/server.db",
                 "--artifacts-destination", str(root / "art"),
                 "--host", "127.0.0.1", "--port", self.url.rsplit(":", 1)[1], "--workers", "1"],
                cwd=root, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.25)
        pytest.fail(f"mlflow server did not answer /health within {timeout} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)

    def api(self, endpoint: str, body: dict | None = None, **query) -> dict:
        url = f"{self.url}/api/2.0/mlflow/{endpoint}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("mlflow_server"))
    yield server
    server.stop()


@pytest.fixture(scope="module", autouse=True)
def _start_server_early(request):
    # The server takes a while to boot; starting it with the module lets the other tests overlap it.
    if any("mlflow_server" in item.fixturenames for item in request.session.items):
        request.getfixturevalue("mlflow_server")


def test_tracking_server_over_rest(tmp_path, mlflow_server):
    pair = make_pair(tmp_path)
    mlflow_server.wait_ready()
    result = track_pair(tracking_uri=mlflow_server.url, config_hash="cfg1", **pair)
    again = track_pair(tracking_uri=mlflow_server.url, config_hash="cfg1", **pair)
    assert again == result

    found = mlflow_server.api("runs/search", {"experiment_ids": [result["experiment_id"]], "max_results": 100})
    runs = {run["info"]["run_id"]: run for run in found["runs"]}
    assert len(runs) == 4
    for stage, run_id in result["runs"].items():
        run = runs[run_id]
        assert run["info"]["status"] == "FINISHED"
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        assert tags["stage"] == stage and tags["mlflow.parentRunId"] == result["parent_run_id"]
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        assert params["seed" if stage == "finetune" else "split"] == ("3" if stage == "finetune" else "test")
        if stage in STAGE_METRICS:
            metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
            assert metrics == expected_metrics(STAGE_METRICS[stage])
            artifacts = mlflow_server.api("artifacts/list", run_id=run_id)
            assert sorted(f["path"] for f in artifacts["files"]) == [
                "i2t_predictions.jsonl", "metrics.json", "t2i_predictions.jsonl"]
    history = mlflow_server.api("metrics/get-history", run_id=result["runs"]["finetune"], metric_key="train_loss")
    assert sorted((m["step"], m["value"]) for m in history["metrics"]) == [(s, loss_at(s)) for s in range(1, STEPS + 1)]


def test_unreachable_server_fails_fast_and_leaves_results_alone(tmp_path):
    pair = make_pair(tmp_path)
    before = tree_digest(pair["results_dir"])
    env_before = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}
    uri = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(TrackingError) as caught:
        track_pair(tracking_uri=uri, config_hash="cfg1", **pair)
    assert time.monotonic() - start < 10
    message = str(caught.value)
    assert uri in message and "untouched" in message and "re-run" in message
    assert tree_digest(pair["results_dir"]) == before
    # The bounded HTTP settings apply within the call only.
    assert {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")} == env_before
