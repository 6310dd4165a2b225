"""Fine-tuning throughput on CPU ranks with and without image-decoding worker processes.

    python bench/bench_dataloader_workers.py [--ranks 2] [--workers 1] [--global-batch 32] [--steps 30] [--json FILE]

The tiny ERNIE-ViL on a demo split, fine-tuned through the real launch path
(:func:`vlretrieval.training.launcher.launch_finetune`) twice: ``dataloader_num_workers`` 0 (the
CPU default, decoding in the training process) and ``--workers`` per rank. ``workers_over_serial``
is the samples/s with workers over the samples/s without (above 1 means the workers pay off on
this machine). Samples/s come from ``train_log.jsonl`` over the steps after the first few;
``serial_wall_over_workers`` compares the whole launches, start-up of the workers included (what a
short demo or test run pays).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from vlretrieval.training.checkpoints import TRAIN_LOG, read_train_log
from vlretrieval.training.launcher import launch_finetune

from bench_finetune import SKIP_STEPS, _prepare
from benchjson import write_figures


def _run(root: Path, split: Path, model_dir: Path, workers: int, args: argparse.Namespace) -> dict:
    work = root / f"work_{workers}"
    hparams = {
        "per_device_train_batch_size": args.global_batch // args.ranks,
        "max_steps": args.steps,
        "save_steps": args.steps * 10,  # no checkpoint inside the measured window
        "warmup_steps": 2,
        "learning_rate": 1e-3,
        "hflip": False,
        "train_max_len": 52,
        "dataloader_num_workers": workers,
    }
    started = time.monotonic()
    launch_finetune(model_dir, split, work, root / f"final_{workers}", n_ranks=args.ranks, use_gpu=False,
                    hparams=hparams)
    wall = time.monotonic() - started
    records = read_train_log(work / TRAIN_LOG)
    assert records[0]["dataloader_num_workers"] == workers, records[0]
    steps = [r for r in records if r["event"] == "train"]
    measured = steps[SKIP_STEPS:]
    elapsed = measured[-1]["time"] - steps[SKIP_STEPS - 1]["time"]
    return {"workers": workers, "samples_per_s": len(measured) * args.global_batch / elapsed, "wall_s": wall}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1, help="worker processes per rank of the compared run")
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here, by name")
    args = parser.parse_args()
    if args.global_batch % args.ranks:
        parser.error("--global-batch must be divisible by --ranks")
    if args.steps <= SKIP_STEPS + 1:
        parser.error(f"--steps must exceed {SKIP_STEPS + 1}")
    if args.workers < 1:
        parser.error("--workers must be at least 1 (0 is the baseline)")

    print(f"cpu cores: {os.cpu_count()}, {args.ranks} ranks, global batch {args.global_batch}, {args.steps} steps",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_workers_") as tmp:
        root = Path(tmp)
        split, model_dir = _prepare(root, args.images)
        serial, workers = (_run(root, split, model_dir, n, args) for n in (0, args.workers))
    ratio = workers["samples_per_s"] / serial["samples_per_s"]
    wall_ratio = serial["wall_s"] / workers["wall_s"]
    print(f"{'workers/rank':>12} {'samples/s':>10} {'wall s':>8}")
    for r in (serial, workers):
        print(f"{r['workers']:>12} {r['samples_per_s']:>10.1f} {r['wall_s']:>8.1f}")
    print(f"{args.workers} workers / serial: {ratio:.2f}x samples/s, {wall_ratio:.2f}x wall time")
    write_figures(args.json, "bench_dataloader_workers",
                  {"serial_samples_per_s": serial["samples_per_s"],
                   "workers_samples_per_s": workers["samples_per_s"], "workers_over_serial": ratio,
                   "serial_wall_s": serial["wall_s"], "workers_wall_s": workers["wall_s"],
                   "serial_wall_over_workers": wall_ratio},
                  command=" ".join(sys.argv), ranks=args.ranks, workers=args.workers,
                  global_batch=args.global_batch, steps=args.steps, images=args.images)
    return 0


if __name__ == "__main__":
    sys.exit(main())
