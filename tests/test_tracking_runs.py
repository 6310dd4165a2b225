"""What the MLflow runs of a pair show a reader: their real times, the evaluation split as a dataset
input, and artifact locations that survive moving the store; on real SQLite stores."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import pytest

from vlretrieval.tracking.mlflow_tracking import track_pair

from .test_tracking import STAGE_JOB_ENDS, STEPS, TRAIN_START, make_pair


def test_runs_are_timed_like_their_jobs_and_evaluations_name_their_split(tmp_path):
    from mlflow import MlflowClient

    pair = make_pair(tmp_path)
    uri = f"sqlite:///{tmp_path}/store/mlflow.db"
    result = track_pair(tracking_uri=uri, config_hash="cfg1", **pair)
    track_pair(tracking_uri=uri, config_hash="cfg1", **pair)  # again: nothing changes
    client = MlflowClient(uri)

    finetune = client.get_run(result["runs"]["finetune"]).info
    # From the start record to the end record of train_log.jsonl.
    assert (finetune.start_time, finetune.end_time) == (int(TRAIN_START * 1000), int((TRAIN_START + STEPS + 0.5) * 1000))
    train_runtime = STEPS - 0.3
    assert abs((finetune.end_time - finetune.start_time) / 1000 - train_runtime) <= 0.1 * train_runtime

    # From the start of extraction (its end minus its 2.25 s) to the end of ranking.
    for stage, (extract_end, rank_end) in STAGE_JOB_ENDS.items():
        info = client.get_run(result["runs"][stage]).info
        assert (info.start_time, info.end_time) == (int((extract_end - 2.25) * 1000), int(rank_end * 1000))
    parent = client.get_run(result["parent_run_id"]).info
    zeroshot_extract_end = STAGE_JOB_ENDS["zeroshot"][0]
    assert (parent.start_time, parent.end_time) == (int((zeroshot_extract_end - 2.25) * 1000),
                                                    int(STAGE_JOB_ENDS["finetuned"][1] * 1000))
    # Summary metrics are stamped when the jobs that produced them ended.
    history = client.get_metric_history(result["runs"]["finetuned"], "mean_recall")
    assert [m.timestamp for m in history] == [int(STAGE_JOB_ENDS["finetuned"][1] * 1000)]

    # The evaluation split, with the digest of its gold texts and validation report, once per run.
    split = pair["split_dir"]
    digest = hashlib.sha256((split / "texts.jsonl").read_bytes() + (split / "validation_report.json").read_bytes())
    for stage in ("zeroshot", "finetuned"):
        inputs = client.get_run(result["runs"][stage]).inputs.dataset_inputs
        assert len(inputs) == 1
        dataset = inputs[0].dataset
        assert (dataset.name, dataset.digest) == ("demo_cn/test", digest.hexdigest()[:32])
        assert json.loads(dataset.source) == {"uri": str(split)}
        assert json.loads(dataset.profile) == {"kept_texts": 5, "kept_images": 3}
        assert {t.key: t.value for t in inputs[0].tags} == {"mlflow.data.context": "evaluation"}
    assert not client.get_run(result["runs"]["finetune"]).inputs.dataset_inputs


def test_a_benchmark_file_without_seconds_is_named(tmp_path):
    from vlretrieval.errors import DataError

    pair = make_pair(tmp_path)
    bad = pair["stage_benchmarks"]["finetuned"][1]
    bad.write_text("h:m:s\tmax_rss\n0:00:01\t120.3\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"rank/demo_cn/ernie_vil/finetuned.tsv.*\"s\" \(seconds\)"):
        track_pair(tracking_uri=f"sqlite:///{tmp_path}/store/mlflow.db", config_hash="cfg1", **pair)
    assert not (tmp_path / "store").exists()


def test_a_copied_store_still_opens_its_artifacts(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    checkout = tmp_path / "checkout"
    pair = make_pair(checkout)
    monkeypatch.chdir(checkout)
    result = track_pair(tracking_uri=f"sqlite:///{checkout}/mlflow.db", config_hash="cfg1", **pair)
    client = MlflowClient(f"sqlite:///{checkout}/mlflow.db")
    assert client.get_experiment(result["experiment_id"]).artifact_location == "mlartifacts"
    run_id = result["runs"]["finetuned"]
    assert client.get_run(run_id).info.artifact_uri.startswith("mlartifacts/")

    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.copy2(checkout / "mlflow.db", moved / "mlflow.db")
    shutil.copytree(checkout / "mlartifacts", moved / "mlartifacts")
    shutil.rmtree(checkout / "mlartifacts")
    monkeypatch.chdir(moved)
    copied = MlflowClient(f"sqlite:///{moved}/mlflow.db")
    assert sorted(a.path for a in copied.list_artifacts(run_id)) == [
        "i2t_predictions.jsonl", "metrics.json", "t2i_predictions.jsonl"]
    fetched = copied.download_artifacts(run_id, "metrics.json", str(tmp_path))
    assert Path(fetched).read_bytes() == (pair["results_dir"] / "metrics.json").read_bytes()


def test_system_metrics_sampled_during_training_land_in_the_training_run(tmp_path):
    from mlflow import MlflowClient

    from vlretrieval.tracking.mlflow_tracking.system import SystemSampler, read_system_samples, system_metrics_path

    pair = make_pair(tmp_path)
    samples_path = system_metrics_path(pair["train_log"])
    with SystemSampler(samples_path, interval_seconds=0.05):
        deadline = time.monotonic() + 0.4
        while time.monotonic() < deadline:  # keep a CPU busy while sampling
            sum(i * i for i in range(10_000))
    samples = read_system_samples(samples_path)
    assert len(samples) >= 3
    assert all(0.0 <= values["system/cpu_utilization_percentage"] <= 100.0 for _, values in samples)
    assert {"system/system_memory_usage_megabytes", "system/disk_usage_percentage",
            "system/network_receive_megabytes"} <= set(samples[0][1])

    uri = f"sqlite:///{tmp_path}/store/mlflow.db"
    result = track_pair(tracking_uri=uri, config_hash="cfg1", **pair)
    track_pair(tracking_uri=uri, config_hash="cfg1", **pair)  # again: nothing logged twice
    client = MlflowClient(uri)
    history = client.get_metric_history(result["runs"]["finetune"], "system/cpu_utilization_percentage")
    assert sorted((m.step, m.timestamp, m.value) for m in history) == [
        (step, stamp, values["system/cpu_utilization_percentage"]) for step, (stamp, values) in enumerate(samples)]
    assert not any(name.startswith("system/") for name in client.get_run(result["runs"]["finetuned"]).data.metrics)


def test_the_experiment_link_opens_a_runs_view_with_the_headline_metrics(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from vlretrieval.tracking.mlflow_tracking import RUNS_VIEW_KEY, RUNS_VIEW_TAG, experiment_link

    pair = make_pair(tmp_path)
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = track_pair(tracking_uri=uri, config_hash="cfg1", **pair)
    assert RUNS_VIEW_TAG == f"mlflow.sharedViewState.{RUNS_VIEW_KEY}"
    view = json.loads(MlflowClient(uri).get_experiment(result["experiment_id"]).tags[RUNS_VIEW_TAG])
    for name in ("finetuned_mean_recall", "zeroshot_mean_recall", "mean_recall_gain"):
        assert f"metrics.`{name}`" in view["selectedColumns"]
        assert f"metrics.`{name}`" in view["columnOrder"]
    assert {"attributes.`Source`", "attributes.`Models`", "attributes.`Dataset`"} <= set(view["selectedColumns"])
    assert (view["orderByKey"], view["orderByAsc"]) == ("attributes.start_time", False)

    link = experiment_link(uri, result["experiment_id"])
    assert link == (f"http://127.0.0.1:5000/#/experiments/{result['experiment_id']}/runs"
                    f"?workflowType=machine_learning&viewStateShareKey={RUNS_VIEW_KEY}")
