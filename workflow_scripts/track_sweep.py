"""Log a sweep's parent run to MLflow, with its members' runs nested under it; idempotent."""

import argparse
import json
from pathlib import Path

from vlretrieval.cli import json_arg, run
from vlretrieval.errors import DataError
from vlretrieval.io import write_json
from vlretrieval.tracking.mlflow_tracking import resolve_tracking_uri
from vlretrieval.tracking.provenance import config_hash, git_commit
from vlretrieval.tracking.sweeps import track_sweep


def read_record(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(path, f"cannot read the member's tracking record: {exc}") from None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--uri", required=True, help="tracking URI from config (MLFLOW_TRACKING_URI overrides it)")
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--plan", type=json_arg, required=True, help="the sweep and its members (JSON)")
    parser.add_argument("--repo", type=Path, required=True, help="the workflow's directory, for its git commit")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    records = [read_record(member["tracking"]) for member in args.plan["members"]]
    # The same plan over the same member runs is the same sweep run; new member runs make a new one.
    identity = {"plan": args.plan, "member_runs": [record.get("parent_run_id") for record in records]}
    result = track_sweep(
        tracking_uri=resolve_tracking_uri(args.uri, Path.cwd()),
        experiment=args.experiment,
        plan=args.plan,
        member_records=records,
        config_hash=config_hash(identity),
        git_commit=git_commit(args.repo),
    )
    write_json(args.out, result)


if __name__ == "__main__":
    raise SystemExit(run(main))
