"""Fine-tune a model with paddle.distributed.launch: GPUs or CPU ranks (gloo), on one node or several.

The ranks come from the environment: with --gpus N, the first N GPUs this node shows
(CUDA_VISIBLE_DEVICES, or SLURM's GPU variables), else --ranks CPU ranks. In a SLURM job of several
nodes this runs in the batch script and starts one launcher per node with srun. Without SLURM, run it
on every node with --nnodes, --node-rank and --master (the same host:port everywhere, node 0's).
"""

import argparse
import contextlib
import os
from pathlib import Path

from vlretrieval.cli import json_arg, run
from vlretrieval.config import CONFIG_SCHEMA, schema_default
from vlretrieval.tracking.mlflow_tracking.system import SystemSampler, system_metrics_path
from vlretrieval.training.launch_plan import complete_slurm_environ, resolve_launch_plan
from vlretrieval.training.launcher import launch_finetune


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, required=True, help="initial model directory")
    parser.add_argument("--train-data", type=Path, required=True, help="serialized training split")
    parser.add_argument("--regions", type=Path, default=None, help="the split's region store (region families)")
    parser.add_argument("--work-dir", type=Path, required=True, help="checkpoints; a rerun resumes from here")
    parser.add_argument("--final-dir", type=Path, required=True, help="the fine-tuned model")
    parser.add_argument("--train-log", type=Path, required=True, help="copy of the per-step loss and learning rate")
    parser.add_argument("--ranks", type=int, required=True, help="CPU ranks per node (when --gpus is 0)")
    parser.add_argument("--gpus", type=int, default=schema_default(CONFIG_SCHEMA, "finetune", "gpus"),
                        help="GPUs per node; 0 runs CPU ranks (default: finetune.gpus of the config schema)")
    parser.add_argument("--hparams", type=json_arg, default={}, help="overrides of the reference recipe (JSON)")
    parser.add_argument("--nnodes", type=int, default=None, help="nodes of a run started by hand on each node")
    parser.add_argument("--node-rank", type=int, default=None, help="this node's index (0 holds global rank 0)")
    parser.add_argument("--master", default=None, help="HOST:PORT of node 0, where the nodes rendezvous")
    parser.add_argument("--master-port", type=int, default=None,
                        help="rendezvous port of a multi-node SLURM job (default: derived from the job id)")
    args = parser.parse_args(argv)
    plan = resolve_launch_plan(
        complete_slurm_environ(os.environ), args.gpus, args.ranks,
        nnodes=args.nnodes, node_rank=args.node_rank, master=args.master, master_port=args.master_port,
    )
    # Node 0 holds rank 0, which writes the training log; its machine is sampled for the MLflow run.
    sampling = SystemSampler(system_metrics_path(args.train_log)) if plan.node_rank == 0 else contextlib.nullcontext()
    with sampling:
        launch_finetune(
            args.model_dir, args.train_data, args.work_dir, args.final_dir,
            train_log_copy=args.train_log, plan=plan, hparams=args.hparams, regions=args.regions,
        )


if __name__ == "__main__":
    raise SystemExit(run(main))
