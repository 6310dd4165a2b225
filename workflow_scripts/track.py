"""Log one pair's runs (parent, fine-tuning, each evaluated stage) to MLflow; idempotent."""

import argparse
from pathlib import Path

from vlretrieval.cli import json_arg, run
from vlretrieval.io import write_json
from vlretrieval.tracking.mlflow_tracking import resolve_tracking_uri, track_pair
from vlretrieval.tracking.provenance import config_hash, dataset_checksum, git_commit


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--uri", required=True, help="tracking URI from config (MLFLOW_TRACKING_URI overrides it)")
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--results", type=Path, required=True, help="results/{dataset}/{model}")
    parser.add_argument("--download", type=Path, required=True, help="the dataset's download directory")
    parser.add_argument("--validation-report", type=Path, required=True)
    parser.add_argument("--split-dir", type=Path, help="the serialized evaluation split, logged as a dataset input")
    parser.add_argument("--stage-benchmarks", type=json_arg, default={},
                        help="JSON: {stage: [benchmark files of the jobs that evaluate it]}, for the runs' times")
    parser.add_argument("--pair-config", type=json_arg, required=True, help="effective dataset and model config (JSON)")
    parser.add_argument("--repo", type=Path, required=True, help="the workflow's directory, for its git commit")
    parser.add_argument("--train-log", type=Path)
    parser.add_argument("--artifacts", type=Path, nargs="*", default=[])
    parser.add_argument("--figures", type=Path, nargs="*", default=[], help="the pair's figures")
    parser.add_argument("--finetuned-model", type=Path, help="a fine-tuned dual encoder, logged as an MLflow model")
    parser.add_argument("--model-max-len", type=int, default=0,
                        help="context length the logged model encodes texts with (0: the model's own)")
    parser.add_argument("--register-model", action="store_true", help="register the logged model as DATASET-MODEL")
    parser.add_argument("--tags", type=json_arg, default={}, help="JSON: tags for every run of the pair (a sweep member's)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    runs = track_pair(
        tracking_uri=resolve_tracking_uri(args.uri, Path.cwd()),
        experiment=args.experiment,
        dataset=args.dataset,
        model=args.model,
        results_dir=args.results,
        params=args.pair_config,
        config_hash=config_hash(args.pair_config),
        git_commit=git_commit(args.repo),
        dataset_checksum=dataset_checksum(args.download),
        train_log=args.train_log,
        validation_report=args.validation_report,
        artifact_files=args.artifacts,
        split_dir=args.split_dir,
        stage_benchmarks={stage: [Path(p) for p in paths] for stage, paths in args.stage_benchmarks.items()},
        figures=args.figures,
        finetuned_model=args.finetuned_model,
        model_max_len=args.model_max_len or None,
        registered_model=f"{args.dataset}-{args.model}" if args.register_model and args.finetuned_model else None,
        extra_tags=args.tags,
    )
    write_json(args.out, runs)


if __name__ == "__main__":
    raise SystemExit(run(main))
