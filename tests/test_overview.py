"""The closing overview of `make demo`: the leaderboard in short and where to look next."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from vlretrieval.config import workflow_config
from vlretrieval.errors import DataError
from vlretrieval.tracking.overview import leaderboard_lines, overview

REPO = Path(__file__).resolve().parent.parent
FIELDS = ["dataset", "model", "stage", "split", "mean_recall", "mean_recall_ci_low", "mean_recall_ci_high"]


def write_results(root: Path, rows: list[list[str]]) -> Path:
    results = root / "results"
    results.mkdir()
    with open(results / "summary.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(FIELDS)
        writer.writerows(rows)
    for dataset, model, stage, *_ in rows:
        (results / dataset / model / stage).mkdir(parents=True, exist_ok=True)
        (results / dataset / model / "metrics.json").write_text("{}")
    return results


def test_lines_carry_each_stage_with_its_interval(tmp_path):
    results = write_results(tmp_path, [
        ["demo_cn", "ernie_vil", "zeroshot", "test", "4.6667", "3.1000", "6.6333"],
        ["demo_cn", "ernie_vil", "finetuned", "test", "51.9333", "48.0042", "55.8000"],
    ])
    lines = leaderboard_lines(results)
    assert [line.split() for line in lines] == [
        ["demo_cn", "ernie_vil", "zeroshot", "4.67", "[3.1,", "6.6]"],
        ["demo_cn", "ernie_vil", "finetuned", "51.93", "[48.0,", "55.8]"],
    ]


def test_overview_names_the_runs_report_figures_and_a_comparison(tmp_path):
    results = write_results(tmp_path, [["demo_cn", "bert_clip", "zeroshot", "test", "5.1", "3.4", "7.2"],
                                       ["demo_cn", "bert_clip", "finetuned", "test", "57.4", "53.3", "62.0"]])
    record = tmp_path / "work" / "demo_cn" / "bert_clip" / "tracking.json"
    record.parent.mkdir(parents=True)
    record.write_text('{"experiment_id": "7", "parent_run_id": "abc"}')
    text = overview(results, "sqlite:///mlflow.db", tmp_path / "work")
    assert "ui --backend-store-uri sqlite:///mlflow.db" in text
    assert "open http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning" in text
    assert "--report report.html" in text
    assert f"{results / 'figures'}/" in text
    assert f"compare {results / 'demo_cn/bert_clip/zeroshot'} {results / 'demo_cn/bert_clip/finetuned'}" in text


def test_missing_leaderboard_and_bad_cell_are_named(tmp_path):
    with pytest.raises(DataError, match="no leaderboard yet"):
        leaderboard_lines(tmp_path)
    results = write_results(tmp_path, [["demo_cn", "ernie_vil", "zeroshot", "test", "n/a", "1", "2"]])
    with pytest.raises(DataError, match=r"summary\.csv:2: mean recall"):
        leaderboard_lines(results)


def test_command_line_reads_the_tracking_uri_from_the_config(tmp_path):
    write_results(tmp_path, [["demo_cn", "ernie_vil", "finetuned", "test", "50.0", "45.0", "55.0"]])
    env = {"PATH": "/usr/bin:/bin", "PYTHONSAFEPATH": "1"}
    done = subprocess.run([sys.executable, "-m", "vlretrieval", "overview"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, check=True)
    assert f"--backend-store-uri {workflow_config()['tracking']['uri']}" in done.stdout
    assert "50.00  [45.0, 55.0]" in done.stdout


def test_workflow_config_is_the_repository_config_with_defaults():
    config = workflow_config()
    assert config["tracking"]["uri"] == "sqlite:///mlflow.db"
    assert config["evaluation"]["bootstrap"]["resamples"] == 1000
