"""Plot recall@k (k = 1..10) of every stage of one pair, both directions, with 95% bootstrap bands."""

import argparse
from pathlib import Path

from vlretrieval.cli import run
from vlretrieval.config import CONFIG_SCHEMA, schema_default
from vlretrieval.tracking.plots import plot_recall_curves


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--results", type=Path, required=True, help="results/{dataset}/{model}")
    parser.add_argument("--gold", type=Path, required=True, help="the evaluation split's texts.jsonl")
    parser.add_argument("--title", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--resamples", type=int,
                        default=schema_default(CONFIG_SCHEMA, "evaluation", "bootstrap", "resamples"),
                        help="bootstrap replicates of the bands (default: evaluation.bootstrap.resamples)")
    parser.add_argument("--seed", type=int, default=schema_default(CONFIG_SCHEMA, "evaluation", "bootstrap", "seed"),
                        help="seed of the bootstrap draws (default: evaluation.bootstrap.seed)")
    args = parser.parse_args(argv)
    plot_recall_curves(args.results, args.gold, args.out, title=args.title, resamples=args.resamples, seed=args.seed)


if __name__ == "__main__":
    raise SystemExit(run(main))
