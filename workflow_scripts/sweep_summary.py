"""Write results/sweeps/NAME/: summary.csv and summary.md of a sweep's members and their spread over seeds."""

import argparse
import json
from pathlib import Path

from vlretrieval.cli import json_arg, run
from vlretrieval.io import atomic_directory
from vlretrieval.tracking.sweeps import SUMMARY_CSV, SUMMARY_MD, load_sweep, write_summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--plan", type=json_arg, required=True, help="the sweep and its members (JSON)")
    parser.add_argument("--tracking", type=Path, help="the sweep's tracking record, to name its MLflow run")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    tracking = json.loads(args.tracking.read_text(encoding="utf-8")) if args.tracking else None
    loaded = load_sweep(args.plan)
    with atomic_directory(args.out) as staging:
        write_summary(args.plan, loaded, staging / SUMMARY_CSV, staging / SUMMARY_MD, tracking)
    print(f"sweep {args.plan['name']}: {len(loaded)} members summarised in {args.out}")


if __name__ == "__main__":
    raise SystemExit(run(main))
