"""Fine-tune a dual encoder on several ranks with paddle.distributed.launch (GPUs, or CPU ranks over gloo)."""

import argparse
from pathlib import Path

from vlretrieval.cli import json_arg, run
from vlretrieval.training.finetune import launch_finetune


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", type=Path, required=True, help="initial model directory")
    parser.add_argument("--train-data", type=Path, required=True, help="serialized training split")
    parser.add_argument("--work-dir", type=Path, required=True, help="checkpoints; a rerun resumes from here")
    parser.add_argument("--final-dir", type=Path, required=True, help="the fine-tuned model")
    parser.add_argument("--train-log", type=Path, required=True, help="copy of the per-step loss and learning rate")
    parser.add_argument("--ranks", type=int, required=True)
    parser.add_argument("--gpus", type=int, default=0, help="GPUs per job; 0 runs CPU ranks")
    parser.add_argument("--hparams", type=json_arg, default={}, help="overrides of the reference recipe (JSON)")
    args = parser.parse_args(argv)
    launch_finetune(
        args.model_dir, args.train_data, args.work_dir, args.final_dir,
        train_log_copy=args.train_log, n_ranks=args.ranks, use_gpu=args.gpus > 0, hparams=args.hparams,
    )


if __name__ == "__main__":
    raise SystemExit(run(main))
