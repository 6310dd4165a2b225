"""Write a pair's initial model directory: pretrained weights, a local directory, separately pretrained
towers, or a random model (tiny, or the published architecture); optionally set to another image size, and pretrained on the training split."""

import argparse
from pathlib import Path

from vlretrieval.cli import json_arg, run
from vlretrieval.models.prepare import prepare_initial_model, vocab_texts_from_split


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--family", required=True)
    parser.add_argument(
        "--init", required=True, type=json_arg,
        help='JSON: "tiny", "random", a pretrained name or local model directory as a string, '
        'or {"vision": NAME_OR_DIR, "text": NAME_OR_DIR} for separately pretrained towers',
    )
    parser.add_argument("--vocab-split", type=Path, help="serialized split whose captions make a random model's vocabulary")
    parser.add_argument("--pretrain", type=json_arg, help="JSON: the model entry's pretrain settings")
    parser.add_argument("--train-split", type=Path, help="serialized training split to pretrain on")
    parser.add_argument("--regions", type=Path, help="region store of the training split (region families)")
    parser.add_argument("--image-size", type=int, help="pixels of the square images the model is set to read")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if not isinstance(args.init, (str, dict)):
        parser.error(f"--init must be a JSON string or object, got {args.init!r}")
    if args.pretrain is not None and not isinstance(args.pretrain, dict):
        parser.error(f"--pretrain must be a JSON object, got {args.pretrain!r}")
    if args.pretrain is None and (args.train_split or args.regions):
        parser.error("--train-split and --regions are the pretraining data: give --pretrain with them")
    vocab_texts = vocab_texts_from_split(args.vocab_split) if args.vocab_split else None
    prepare_initial_model(args.family, args.init, args.out, vocab_texts=vocab_texts, pretrain=args.pretrain,
                          train_data=args.train_split, regions=args.regions, image_size=args.image_size)


if __name__ == "__main__":
    raise SystemExit(run(main))
