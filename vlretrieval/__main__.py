"""Command-line tools of the package: ``python -m vlretrieval COMMAND ...``.

    python -m vlretrieval compare results/demo_cn/ernie_vil/zeroshot results/demo_cn/ernie_vil/finetuned
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .cli import run
from .config import CONFIG_SCHEMA, schema_default, workflow_config


def compare_command(args: argparse.Namespace) -> None:
    from .io import write_json
    from .retrieval.compare import compare_folders, format_report

    report = compare_folders(args.a, args.b, resamples=args.resamples, seed=args.seed)
    print(format_report(report))
    if args.json is not None:
        write_json(args.json, report)


def overview_command(args: argparse.Namespace) -> None:
    import os

    from .tracking.overview import overview

    uri = os.environ.get("MLFLOW_TRACKING_URI") or args.uri or workflow_config()["tracking"]["uri"]
    print(overview(args.results, uri))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m vlretrieval", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    compare = commands.add_parser(
        "compare", help="paired comparison of two evaluated stages on the same queries",
        description="Every recall figure of A and B, the difference B - A, its 95%% paired-bootstrap interval "
                    "and a sign-flip permutation p-value.")
    compare.add_argument("a", type=Path, help="stage folder results/{dataset}/{model}/{stage}")
    compare.add_argument("b", type=Path, help="stage folder on the same dataset, split and gold")
    compare.add_argument("--json", type=Path, default=None, help="also write the report here")
    compare.add_argument("--resamples", type=int,
                         default=schema_default(CONFIG_SCHEMA, "evaluation", "bootstrap", "resamples"),
                         help="bootstrap replicates and permutations (default: evaluation.bootstrap.resamples)")
    compare.add_argument("--seed", type=int, default=schema_default(CONFIG_SCHEMA, "evaluation", "bootstrap", "seed"),
                         help="seed of the draws (default: evaluation.bootstrap.seed)")
    compare.set_defaults(handler=compare_command)

    summary = commands.add_parser(
        "overview", help="the leaderboard in short and where to look next (runs, report, figures)",
        description="Printed at the end of `make demo`: each stage's mean recall with its interval, then the "
                    "commands that open the MLflow runs, the report and the figures.")
    summary.add_argument("--results", type=Path, default=Path("results"), help="the workflow's results folder")
    summary.add_argument("--uri", default=None,
                         help="tracking URI (default: MLFLOW_TRACKING_URI, else tracking.uri of config/config.yaml)")
    summary.set_defaults(handler=overview_command)

    args = parser.parse_args(argv)
    args.handler(args)


if __name__ == "__main__":
    raise SystemExit(run(main))
