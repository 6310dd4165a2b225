"""Write a serialized split as a ViLT-style Arrow file (image, caption, image_id, split, text_ids)."""

import argparse
from pathlib import Path

from vlretrieval.cli import run
from vlretrieval.data.arrow_store import DEFAULT_BATCH_BYTES, DEFAULT_BATCH_ROWS, serialize_arrow


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--split-dir", type=Path, required=True,
                        help="the serialized split (resources/{dataset}/lmdb/{split})")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--name", required=True, help="file name prefix: the file is {name}_{split}.arrow")
    parser.add_argument("--split", default=None,
                        help="split name written to the file (default: the split directory's name)")
    parser.add_argument("--batch-rows", type=int, default=DEFAULT_BATCH_ROWS, help="most rows per record batch")
    parser.add_argument("--batch-mb", type=float, default=DEFAULT_BATCH_BYTES / (1 << 20),
                        help="image megabytes per record batch, roughly")
    args = parser.parse_args(argv)
    serialize_arrow(
        args.split_dir, args.out, name=args.name, split=args.split, batch_rows=args.batch_rows,
        batch_bytes=max(1, int(args.batch_mb * (1 << 20))),
    )


if __name__ == "__main__":
    raise SystemExit(run(main))
