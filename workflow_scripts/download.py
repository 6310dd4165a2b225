"""Fetch, verify and extract one dataset's files into its download directory."""

import argparse
from pathlib import Path

from vlretrieval.cli import json_arg, run
from vlretrieval.config import CONFIG_SCHEMA, schema_default
from vlretrieval.data.download import download_dataset


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", required=True)
    parser.add_argument("--entry", type=json_arg, required=True, help="the dataset's registry entry (JSON)")
    parser.add_argument("--dest", type=Path, required=True)
    parser.add_argument("--cache-dir", type=Path, required=True, help="fetched files are kept here between runs")
    parser.add_argument("--checksum-dir", type=Path, required=True, help="digests recorded on first download")
    parser.add_argument("--timeout", type=float, default=schema_default(CONFIG_SCHEMA, "data", "download_timeout"),
                        help="seconds per request (default: data.download_timeout of the config schema)")
    parser.add_argument("--retries", type=int, default=schema_default(CONFIG_SCHEMA, "data", "download_retries"),
                        help="attempts per file (default: data.download_retries of the config schema)")
    args = parser.parse_args(argv)
    download_dataset(
        args.name,
        args.entry,
        args.dest,
        cache_dir=args.cache_dir,
        checksum_dir=args.checksum_dir,
        timeout=args.timeout,
        retries=args.retries,
    )


if __name__ == "__main__":
    raise SystemExit(run(main))
