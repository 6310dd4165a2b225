"""Validate one split's region features and object tags and store them beside its serialized split."""

import argparse
from pathlib import Path

from vlretrieval.cli import json_arg, run
from vlretrieval.config import CONFIG_SCHEMA, schema_default
from vlretrieval.data.regions import serialize_split_regions


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--entry", type=json_arg, required=True, help="the dataset's registry entry (JSON, with 'regions')")
    parser.add_argument("--source", type=Path, required=True, help="the dataset's download directory")
    parser.add_argument("--split-dir", type=Path, required=True, help="the split's serialized LMDB directory (its image ids)")
    parser.add_argument("--split", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--on-bad-record", choices=("error", "skip"),
                        default=schema_default(CONFIG_SCHEMA, "data", "on_bad_record"),
                        help="stop at a bad record, or skip and report it (default: data.on_bad_record of the config schema)")
    args = parser.parse_args(argv)
    report = serialize_split_regions(
        args.source, args.entry, args.split, args.split_dir, args.out, on_bad_record=args.on_bad_record
    )
    print(f"{args.out}: {report.images} images, {report.boxes} regions, {len(report.skipped)} bad rows skipped,"
          f" {report.other_images} rows of other splits passed over")


if __name__ == "__main__":
    raise SystemExit(run(main))
