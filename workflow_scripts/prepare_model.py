"""Write a pair's initial model directory: pretrained weights, a local directory, or a tiny random model."""

import argparse
from pathlib import Path

from vlretrieval.cli import run
from vlretrieval.training.finetune import prepare_initial_model, vocab_texts_from_split


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--family", required=True)
    parser.add_argument("--init", required=True, help="pretrained name, local model directory, or 'tiny'")
    parser.add_argument("--vocab-split", type=Path, help="serialized split whose captions make a tiny model's vocabulary")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    vocab_texts = vocab_texts_from_split(args.vocab_split) if args.vocab_split else None
    prepare_initial_model(args.family, args.init, args.out, vocab_texts=vocab_texts)


if __name__ == "__main__":
    raise SystemExit(run(main))
