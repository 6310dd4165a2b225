"""Fine-tuning throughput of the tiny ERNIE-ViL on CPU: 1 rank versus N ranks at the same global batch.

    python bench/bench_finetune.py [--ranks 2] [--global-batch 32] [--steps 30] [--recompute] [--json FILE]

Builds a demo split and a tiny model in a temporary directory, fine-tunes through the real launch
path (``paddle.distributed.launch`` + :mod:`vlretrieval.training.finetune`) once per rank count, and
reports samples/s measured from ``train_log.jsonl`` over the steps after the first few (which include
start-up and lazy initialisation), plus the wall time of each launch. ``two_ranks_over_one`` is
the samples/s of ``--ranks`` ranks over one rank (above 1 means the extra ranks pay off).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from vlretrieval.data.demo import DemoSpec, write_demo_archive
from vlretrieval.data.lmdb_store import serialize_split
from vlretrieval.models.prepare import prepare_initial_model, vocab_texts_from_split
from vlretrieval.training.checkpoints import TRAIN_LOG, read_train_log
from vlretrieval.training.launcher import launch_command, launch_env

from benchjson import write_figures

SKIP_STEPS = 5


def _prepare(root: Path, images: int) -> tuple[Path, Path]:
    spec = DemoSpec(name="demo_bench", seed=1, sizes={"train": images})
    write_demo_archive(spec, root / "demo.zip")
    with zipfile.ZipFile(root / "demo.zip") as archive:
        archive.extractall(root / "sources")
    split = root / "lmdb" / "train"
    serialize_split("raw_tsv", root / "sources", "train", split, entry={"root": spec.name}, progress=False)
    model_dir = prepare_initial_model("ernie_vil", "tiny", root / "init", vocab_texts=vocab_texts_from_split(split), seed=0)
    return split, model_dir


def _run(root: Path, split: Path, model_dir: Path, ranks: int, args: argparse.Namespace) -> dict:
    work = root / f"work_{ranks}"
    hparams = {
        "per_device_train_batch_size": args.global_batch // ranks,
        "max_steps": args.steps,
        "save_steps": args.steps * 10,  # no checkpoint inside the measured window
        "warmup_steps": 2,
        "learning_rate": 1e-3,
        "hflip": False,
        "recompute": args.recompute,
        "train_max_len": 52,
    }
    cmd = launch_command(
        ranks, False, work / "launch_logs",
        ["--model-dir", str(model_dir), "--train-data", str(split), "--output-dir", str(work),
         "--final-dir", str(root / f"final_{ranks}"), "--hparams-json", json.dumps(hparams)],
    )
    start = time.monotonic()
    proc = subprocess.run(cmd, env=launch_env(ranks, False), capture_output=True, text=True)
    wall = time.monotonic() - start
    if proc.returncode != 0:
        logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted((work / "launch_logs").glob("workerlog.*")))
        raise SystemExit(f"{ranks}-rank run failed:\n{proc.stdout[-2000:]}\n{logs}")
    steps = [r for r in read_train_log(work / TRAIN_LOG) if r["event"] == "train"]
    measured = steps[SKIP_STEPS:]
    elapsed = measured[-1]["time"] - steps[SKIP_STEPS - 1]["time"]
    return {
        "ranks": ranks,
        "per_rank_batch": hparams["per_device_train_batch_size"],
        "samples_per_s": len(measured) * args.global_batch / elapsed,
        "wall_s": wall,
        "final_loss": steps[-1]["loss"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--recompute", action="store_true", help="recompute activations (the reference recipe)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here, by name")
    args = parser.parse_args()
    if args.global_batch % args.ranks:
        parser.error("--global-batch must be divisible by --ranks")
    if args.steps <= SKIP_STEPS + 1:
        parser.error(f"--steps must exceed {SKIP_STEPS + 1}")

    print(f"cpu cores: {os.cpu_count()}, global batch {args.global_batch}, {args.steps} steps, "
          f"recompute {args.recompute}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_finetune_") as tmp:
        root = Path(tmp)
        split, model_dir = _prepare(root, args.images)
        results = [_run(root, split, model_dir, ranks, args) for ranks in sorted({1, args.ranks})]
    print(f"{'ranks':>5} {'batch/rank':>10} {'samples/s':>10} {'wall s':>8} {'last loss':>9}")
    for r in results:
        print(f"{r['ranks']:>5} {r['per_rank_batch']:>10} {r['samples_per_s']:>10.1f} {r['wall_s']:>8.1f} {r['final_loss']:>9.4f}")
    figures = {}
    for r in results:
        figures[f"ranks_{r['ranks']}_samples_per_s"] = r["samples_per_s"]
        figures[f"ranks_{r['ranks']}_wall_s"] = r["wall_s"]
    if len(results) == 2:
        speedup = results[1]["samples_per_s"] / results[0]["samples_per_s"]
        print(f"speed-up {results[1]['ranks']} ranks / 1 rank: {speedup:.2f}x")
        # The figure's name states the default comparison; another --ranks is recorded in the context.
        figures["two_ranks_over_one"] = speedup
    write_figures(args.json, "bench_finetune", figures, ranks=args.ranks, global_batch=args.global_batch,
                  steps=args.steps, skip_steps=SKIP_STEPS, images=args.images, recompute=args.recompute)
    return 0


if __name__ == "__main__":
    sys.exit(main())
