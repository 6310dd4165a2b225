"""Export a saved dual encoder to static inference models (image and text towers) for paddle.inference."""

import argparse
from pathlib import Path

from vlretrieval.cli import json_arg, run
from vlretrieval.models.export import export_model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", type=Path, required=True, help="model directory saved by the package")
    parser.add_argument("--eval", type=json_arg, default={}, help="max_len from the model entry's eval block (JSON)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads of the check run after export")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    export_model(args.model_dir, args.out, max_len=args.eval.get("max_len"), threads=args.threads)


if __name__ == "__main__":
    raise SystemExit(run(main))
