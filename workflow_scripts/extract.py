"""Extract L2-normalised image and text features of one split with a dual encoder."""

import argparse
from pathlib import Path

from vlretrieval.cli import json_arg, run
from vlretrieval.config import MODELS_SCHEMA, validate_against_schema
from vlretrieval.retrieval.extract import extract_split


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", type=Path, required=True,
                        help="saved model directory (engine dynamic) or exported model directory (engine inference)")
    parser.add_argument("--split-dir", type=Path, required=True, help="serialized split (LMDB directory)")
    parser.add_argument("--eval", type=json_arg, required=True,
                        help="engine, max_len and batch sizes from the model entry's eval block (JSON); keys left "
                        "out take the model schema's defaults (config/schemas/models.schema.yaml)")
    parser.add_argument("--threads", type=int, default=None, help="CPU math-library threads of the inference engine")
    parser.add_argument("--export-reference", action="store_true", help="also write *.img_feat.jsonl / *.txt_feat.jsonl")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    settings = validate_against_schema(args.eval, MODELS_SCHEMA, "--eval", keys=("eval",))
    extract_split(
        args.model_dir, args.split_dir, args.out,
        engine=settings["engine"],
        threads=args.threads,
        max_len=settings.get("max_len"),
        image_batch_size=settings["image_batch_size"],
        text_batch_size=settings["text_batch_size"],
        export_reference=args.export_reference,
    )


if __name__ == "__main__":
    raise SystemExit(run(main))
