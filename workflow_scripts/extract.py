"""Extract L2-normalised image and text features of one split with a dual encoder."""

import argparse
from pathlib import Path

from vlretrieval.cli import json_arg, run
from vlretrieval.retrieval.extract import extract_split


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--split-dir", type=Path, required=True, help="serialized split (LMDB directory)")
    parser.add_argument("--eval", type=json_arg, default={}, help="max_len and batch sizes from the model entry's eval block (JSON)")
    parser.add_argument("--export-reference", action="store_true", help="also write *.img_feat.jsonl / *.txt_feat.jsonl")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    extract_split(
        args.model_dir, args.split_dir, args.out,
        max_len=args.eval.get("max_len"),
        image_batch_size=args.eval["image_batch_size"],
        text_batch_size=args.eval["text_batch_size"],
        export_reference=args.export_reference,
    )


if __name__ == "__main__":
    raise SystemExit(run(main))
