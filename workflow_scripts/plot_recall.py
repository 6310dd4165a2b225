"""Plot recall@k (k = 1..10) of every stage of one pair, both directions."""

import argparse
from pathlib import Path

from vlretrieval.cli import run
from vlretrieval.tracking.plots import plot_recall_curves


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--results", type=Path, required=True, help="results/{dataset}/{model}")
    parser.add_argument("--gold", type=Path, required=True, help="the evaluation split's texts.jsonl")
    parser.add_argument("--title", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    plot_recall_curves(args.results, args.gold, args.out, title=args.title)


if __name__ == "__main__":
    raise SystemExit(run(main))
