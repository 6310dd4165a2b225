"""Extract L2-normalised image and text features of one split with a dual encoder."""

import argparse
from pathlib import Path

from vlretrieval.cli import json_arg, run
from vlretrieval.retrieval.extract import extract_split


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", type=Path, required=True,
                        help="saved model directory (engine dynamic) or exported model directory (engine inference)")
    parser.add_argument("--split-dir", type=Path, required=True, help="serialized split (LMDB directory)")
    parser.add_argument("--eval", type=json_arg, default={},
                        help="engine, max_len and batch sizes from the model entry's eval block (JSON)")
    parser.add_argument("--threads", type=int, default=None, help="CPU math-library threads of the inference engine")
    parser.add_argument("--export-reference", action="store_true", help="also write *.img_feat.jsonl / *.txt_feat.jsonl")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    extract_split(
        args.model_dir, args.split_dir, args.out,
        engine=args.eval.get("engine", "dynamic"),
        threads=args.threads,
        max_len=args.eval.get("max_len"),
        image_batch_size=args.eval.get("image_batch_size", 64),
        text_batch_size=args.eval.get("text_batch_size", 256),
        export_reference=args.export_reference,
    )


if __name__ == "__main__":
    raise SystemExit(run(main))
