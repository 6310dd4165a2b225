"""Score each stage's predictions against the split's gold and write results/{dataset}/{model}/."""

import argparse
from pathlib import Path

from vlretrieval.cli import json_arg, run
from vlretrieval.config import CONFIG_SCHEMA, MODELS_SCHEMA, schema_default
from vlretrieval.retrieval.evaluate import write_pair_results


def stage_arg(text):
    stage, sep, path = text.partition("=")
    if not sep or not stage or not path:
        raise ValueError("expected STAGE=PREDICTIONS_DIR")
    return stage, Path(path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--split", required=True)
    parser.add_argument("--split-dir", type=Path, required=True, help="serialized evaluation split (holds texts.jsonl)")
    parser.add_argument("--stage", type=stage_arg, action="append", required=True, help="STAGE=PREDICTIONS_DIR, repeated")
    parser.add_argument("--top-k", type=int, default=schema_default(MODELS_SCHEMA, "eval", "top_k"),
                        help="predictions per query (default: eval.top_k of the model schema)")
    parser.add_argument("--protocol", type=json_arg, default=None, help="how the predictions were made (JSON)")
    parser.add_argument("--bootstrap-resamples", type=int,
                        default=schema_default(CONFIG_SCHEMA, "evaluation", "bootstrap", "resamples"),
                        help="bootstrap replicates of each interval (default: evaluation.bootstrap.resamples)")
    parser.add_argument("--bootstrap-seed", type=int,
                        default=schema_default(CONFIG_SCHEMA, "evaluation", "bootstrap", "seed"),
                        help="seed of the bootstrap draws (default: evaluation.bootstrap.seed)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    metrics = write_pair_results(
        args.out, dataset=args.dataset, model=args.model, split=args.split,
        split_dir=args.split_dir, stage_predictions=dict(args.stage), k=args.top_k, protocol=args.protocol,
        resamples=args.bootstrap_resamples, seed=args.bootstrap_seed,
    )
    for stage, scores in metrics["stages"].items():
        low, high = scores["ci95_mean_recall"]
        print(f"{args.dataset}/{args.model} {stage}: mean recall {scores['mean_recall']:.2f} [{low:.1f}, {high:.1f}]")


if __name__ == "__main__":
    raise SystemExit(run(main))
