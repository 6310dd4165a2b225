"""Write the retrieval gallery of one pair: a fixed sample of text and image queries with each stage's
best-ranked items, as one self-contained HTML page."""

import argparse
import json
from pathlib import Path

from vlretrieval.cli import run
from vlretrieval.config import CONFIG_SCHEMA, schema_default
from vlretrieval.tracking.gallery import describe, write_gallery


def _default(key):
    return schema_default(CONFIG_SCHEMA, "report", "gallery", key)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--results", type=Path, required=True, help="results/{dataset}/{model}")
    parser.add_argument("--split", type=Path, required=True, help="the evaluation split's serialized folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--queries", type=int, default=_default("queries"),
                        help="text queries, and as many image queries (default: report.gallery.queries)")
    parser.add_argument("--top", type=int, default=_default("top"),
                        help="items shown per query (default: report.gallery.top)")
    parser.add_argument("--seed", type=int, default=_default("seed"), help="seed of the sample (default: report.gallery.seed)")
    parser.add_argument("--thumbnail", type=int, default=_default("thumbnail"),
                        help="longest thumbnail side in pixels (default: report.gallery.thumbnail)")
    args = parser.parse_args(argv)
    gallery = write_gallery(args.results, args.split, args.out, queries=args.queries, top=args.top, seed=args.seed,
                            thumbnail=args.thumbnail)
    print(json.dumps(describe(gallery)))


if __name__ == "__main__":
    raise SystemExit(run(main))
