"""Write results/summary.csv, results/summary.md and results/summary.html from every metrics.json present."""

import argparse
from pathlib import Path

from vlretrieval.cli import run
from vlretrieval.config import CONFIG_SCHEMA, schema_default
from vlretrieval.tracking.leaderboard import find_metrics, leaderboard_rows, load_reported, write_leaderboard


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--results-dir", type=Path, required=True)
    parser.add_argument("--reported", type=Path, required=True, help="numbers reported elsewhere (YAML)")
    parser.add_argument("--csv", type=Path, required=True)
    parser.add_argument("--md", type=Path, required=True)
    parser.add_argument("--html", type=Path, required=True, help="the table as a self-contained HTML page")
    parser.add_argument("--resamples", type=int,
                        default=schema_default(CONFIG_SCHEMA, "evaluation", "bootstrap", "resamples"),
                        help="permutations of the paired tests (default: evaluation.bootstrap.resamples)")
    parser.add_argument("--seed", type=int, default=schema_default(CONFIG_SCHEMA, "evaluation", "bootstrap", "seed"),
                        help="seed of the paired tests (default: evaluation.bootstrap.seed)")
    args = parser.parse_args(argv)
    rows = leaderboard_rows(find_metrics(args.results_dir), load_reported(args.reported),
                            resamples=args.resamples, seed=args.seed)
    write_leaderboard(rows, args.csv, args.md, args.html)
    print(f"{len(rows)} rows")


if __name__ == "__main__":
    raise SystemExit(run(main))
