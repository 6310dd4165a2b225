"""Validate one raw split and serialize it to a memory-mappable LMDB directory."""

import argparse
from pathlib import Path

from vlretrieval.cli import json_arg, run
from vlretrieval.config import CONFIG_SCHEMA, schema_default
from vlretrieval.data.lmdb_store import serialize_split


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--entry", type=json_arg, required=True, help="the dataset's registry entry (JSON)")
    parser.add_argument("--source", type=Path, required=True, help="the dataset's download directory")
    parser.add_argument("--split", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--on-bad-record", choices=("error", "skip"),
                        default=schema_default(CONFIG_SCHEMA, "data", "on_bad_record"),
                        help="stop at a bad record, or skip and report it (default: data.on_bad_record of the config schema)")
    parser.add_argument("--workers", type=int, default=None, help="threads checking images")
    args = parser.parse_args(argv)
    serialize_split(
        args.entry["format"], args.source, args.split, args.out, entry=args.entry, on_bad_record=args.on_bad_record,
        workers=args.workers,
    )


if __name__ == "__main__":
    raise SystemExit(run(main))
