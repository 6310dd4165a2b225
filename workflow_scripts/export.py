"""Export a saved dual encoder to static inference models (image and text towers) for paddle.inference."""

import argparse
from pathlib import Path

from vlretrieval.cli import json_arg, run
from vlretrieval.config import MODELS_SCHEMA, validate_against_schema
from vlretrieval.models.export import export_model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", type=Path, required=True, help="model directory saved by the package")
    parser.add_argument("--eval", type=json_arg, default={},
                        help="max_len and precision from the model entry's eval block (JSON); keys left out take "
                        "the model schema's defaults (config/schemas/models.schema.yaml)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads of the check run after export")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    settings = validate_against_schema(args.eval, MODELS_SCHEMA, "--eval", keys=("eval",))
    export_model(args.model_dir, args.out, max_len=settings.get("max_len"), threads=args.threads,
                 precision=settings["precision"])


if __name__ == "__main__":
    raise SystemExit(run(main))
