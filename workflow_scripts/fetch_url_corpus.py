"""Fetch and filter the images of a text,url,filename CSV and write the dataset's raw layout."""

import argparse
from pathlib import Path

from vlretrieval.cli import json_arg, run
from vlretrieval.config import CONFIG_SCHEMA, schema_default
from vlretrieval.data.url_corpus import build_url_corpus


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--entry", type=json_arg, required=True, help="the dataset's registry entry (JSON)")
    parser.add_argument("--source", type=Path, required=True, help="the dataset's download directory (holds the CSV)")
    parser.add_argument("--out", type=Path, required=True, help="the raw layout and the filter report go here")
    parser.add_argument("--cache-dir", type=Path, required=True, help="images are kept here between runs")
    parser.add_argument("--on-bad-record", choices=("error", "skip"),
                        default=schema_default(CONFIG_SCHEMA, "data", "on_bad_record"),
                        help="what a defective CSV row does: stop the job, or be dropped and reported (default: data.on_bad_record of the config schema)")
    args = parser.parse_args(argv)
    build_url_corpus(args.entry, args.source, args.out, cache_dir=args.cache_dir, policy=args.on_bad_record)


if __name__ == "__main__":
    raise SystemExit(run(main))
