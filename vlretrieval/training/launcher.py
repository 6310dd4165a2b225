"""Starting fine-tuning through ``paddle.distributed.launch`` and waiting for it.

:func:`launch_command` builds the launcher's command line for one node, :func:`slurm_launch_command`
the ``srun`` that starts a launcher on every node of a SLURM job, and :func:`launch_env` its
environment. :func:`launch_finetune`, which the workflow calls, claims the work dir for the run,
forwards termination signals to the launcher and checks the result.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import ConfigError, VLRetrievalError
from ..io import atomic_path
from .checkpoints import TRAIN_LOG, claim_work_dir, run_identity
from .hparams import check_amp_device, resolve_hparams
from .launch_plan import LaunchPlan, _int_or_none, master_endpoint


def launch_command(
    n_ranks: int,
    use_gpu: bool,
    log_dir: str | os.PathLike,
    args: Sequence[str],
    *,
    python: str | None = None,
    max_restart: int = 0,
    devices: Sequence[str] | None = None,
    nnodes: int = 1,
    node_rank: int | str = 0,
    master: str | None = None,
    job_id: str | None = None,
) -> list[str]:
    """The ``paddle.distributed.launch`` command line that runs the fine-tuning worker on ``n_ranks`` ranks of a node.

    ``args`` are the worker's own arguments (``--model-dir ... --final-dir ...``). CPU ranks are
    started with ``--nproc_per_node`` (gloo), GPU ranks with ``--gpus`` and the device labels
    ``devices`` (default ``0,..,n-1``); the launcher takes them as entries of ``CUDA_VISIBLE_DEVICES``
    when that is set. ``max_restart`` defaults to 0 so a failure surfaces at once; the next run
    resumes from the last complete checkpoint anyway.

    With ``nnodes > 1`` this is one node's launcher: ``--nnodes``, ``--master`` (``ip:port``, where
    the launcher of the node whose address it is serves the rendezvous) and ``--rank`` (this node's
    index; node 0 holds global rank 0). Each node logs to ``log_dir/node<rank>``, because the nodes
    usually share the work directory and every launcher names its files ``workerlog.<local rank>``.
    """
    if n_ranks < 1:
        raise ValueError(f"n_ranks must be >= 1, got {n_ranks}")
    if nnodes < 1:
        raise ValueError(f"nnodes must be >= 1, got {nnodes}")
    python = python or sys.executable
    log_dir = os.fspath(log_dir)
    if nnodes > 1:
        if not master:
            raise ValueError("a launch on several nodes needs the master address (ip:port)")
        log_dir = os.path.join(log_dir, f"node{node_rank}")
    cmd = [python, "-m", "paddle.distributed.launch", "--log_dir", log_dir, "--max_restart", str(max_restart)]
    if nnodes > 1:
        cmd += ["--nnodes", str(nnodes), "--master", master, "--rank", str(node_rank)]
        if job_id:
            cmd += ["--job_id", job_id]
    if use_gpu and (devices is not None or nnodes == 1):
        labels = list(devices) if devices is not None else [str(i) for i in range(n_ranks)]
        if len(labels) != n_ranks:
            raise ValueError(f"{n_ranks} GPU ranks need {n_ranks} devices, got {labels}")
        cmd += ["--gpus", ",".join(labels)]
    else:
        # GPU ranks without labels are the launch on several nodes from one command line, whose
        # nodes need not share their labels (SLURM may hand out GPUs 0,1 on one node and 2,3 on
        # another): each launcher then takes its node's first n_ranks visible GPUs.
        cmd += ["--nproc_per_node", str(n_ranks)]
    cmd += [python, "-m", "vlretrieval.training.finetune", *map(str, args)]
    if not use_gpu and "--device" not in args:
        cmd += ["--device", "cpu"]
    return cmd


def slurm_launch_command(plan: LaunchPlan, log_dir: str | os.PathLike, args: Sequence[str], *, master: str,
                         python: str | None = None, max_restart: int = 0, environ: Mapping[str, str] | None = None) -> list[str]:
    """``srun`` that starts one launcher on every node of the SLURM job, node rank ``SLURM_NODEID``.

    Run on the first node, from the batch script or from a step inside the job
    (``plan.inside_step``, which adds ``--overlap``). ``--kill-on-bad-exit`` ends every node when one
    fails, rather than leaving the others waiting in a collective. The step spans all the job's
    CPUs of each node (no ``--exact``, no binding to one core); the launcher splits them between
    its ranks.
    """
    environ = os.environ if environ is None else environ
    marker = "\0node\0"
    per_node = launch_command(
        plan.nproc_per_node, plan.use_gpu, log_dir, args, python=python, max_restart=max_restart,
        nnodes=plan.nnodes, node_rank=marker, master=master, job_id=plan.job_id,
    )
    script = "exec " + " ".join(
        '"${SLURM_NODEID}"'.join(shlex.quote(piece) if piece else "" for piece in part.split(marker))
        if marker in part else shlex.quote(part)
        for part in per_node
    )
    cmd = ["srun", f"--nodes={plan.nnodes}", f"--ntasks={plan.nnodes}", "--ntasks-per-node=1",
           "--kill-on-bad-exit=1", "--cpu-bind=none"]
    if plan.inside_step:
        # The enclosing step (e.g. the executor plugin's `srun -n1`) holds the first node's CPUs
        # while it waits for this one; without sharing them the new step would never start.
        cmd.append("--overlap")
    if environ.get("SLURM_CPUS_PER_TASK"):
        cmd.append(f"--cpus-per-task={environ['SLURM_CPUS_PER_TASK']}")
    return cmd + ["sh", "-c", script]


# Launcher settings that paddle.distributed.launch takes from the environment over its command
# line; left over from an enclosing launch (or a user's shell) they would silently replace the
# node count, master, node rank or devices this module chose.
_LAUNCH_OVERRIDES = (
    "PADDLE_MASTER", "PADDLE_NNODES", "PADDLE_RANK", "PADDLE_TRAINER_ID", "PADDLE_JOB_ID",
    "PADDLE_NPROC_PER_NODE", "PADDLE_DEVICES", "PADDLE_LOG_DIR", "PADDLE_MAX_RESTART", "PADDLE_RUN_MODE",
    "POD_IP", "PADDLE_IPS", "PADDLE_START_PORT",
)


def launch_env(n_ranks: int, use_gpu: bool, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for :func:`launch_command`: quiet glog, and on CPU the cores split between a node's ranks."""
    env = dict(os.environ if base is None else base)
    for name in _LAUNCH_OVERRIDES:
        env.pop(name, None)
    env.setdefault("GLOG_v", "0")
    env.setdefault("GLOG_minloglevel", "2")
    if not use_gpu:
        # The job's thread budget (Snakemake exports OMP_NUM_THREADS=threads to every job) is split
        # between the ranks; left as it is, each rank would take the whole budget and they would
        # oversubscribe the cores.
        budget = _int_or_none(env.get("OMP_NUM_THREADS")) or len(os.sched_getaffinity(0)) or 1
        per_rank = str(max(1, budget // max(1, n_ranks)))
        for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[name] = per_rank
    return env


class FinetuneError(VLRetrievalError):
    """The distributed fine-tuning job failed; the message points at the rank logs."""


def _die_with_parent() -> None:
    # Runs in the launcher child before exec: if the process that started it dies (even by SIGKILL),
    # the launcher gets SIGTERM and stops its ranks instead of training on unattended.
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")[-limit:]
    except OSError:
        return ""


def launch_finetune(
    model_dir: str | os.PathLike,
    train_data: str | os.PathLike,
    work_dir: str | os.PathLike,
    final_dir: str | os.PathLike,
    *,
    n_ranks: int | None = None,
    use_gpu: bool = False,
    plan: LaunchPlan | None = None,
    hparams: Mapping[str, Any] | None = None,
    train_log_copy: str | os.PathLike | None = None,
    family_name: str | None = None,
    max_restart: int = 0,
    regions: str | os.PathLike | None = None,
) -> dict[str, Any] | None:
    """Run :func:`~vlretrieval.training.finetune.finetune` through ``paddle.distributed.launch`` and wait.

    ``plan`` (:func:`resolve_launch_plan`) says where the ranks go; without one, ``n_ranks`` ranks
    on this node (GPUs with ``use_gpu``). Hyperparameters are validated here first, so a bad config
    fails before any rank starts. Rank logs go to ``work_dir/launch_logs/workerlog.<rank>`` (with
    several nodes ``launch_logs/node<n>/workerlog.<local rank>``). SIGTERM and SIGINT are forwarded
    to the launcher (or to ``srun``, which passes them to every node), which stops its ranks;
    checkpoints stay in ``work_dir`` and the next call resumes.

    The node that holds global rank 0 (node 0, or the SLURM batch step that starts all nodes) owns
    the work directory: it discards checkpoints of another run, and on success copies
    ``train_log.jsonl`` atomically to ``train_log_copy`` (when given) and returns the final model's
    info. Other nodes of a run started by hand only wait for their launcher and return None.
    """
    from ..models.base import read_model_info

    if plan is None:
        if n_ranks is None:
            raise TypeError("launch_finetune needs n_ranks or plan")
        plan = LaunchPlan(n_ranks, use_gpu, tuple(str(i) for i in range(n_ranks)) if use_gpu else ())
    resolved = resolve_hparams(hparams)
    check_amp_device(resolved["amp"], "gpu" if plan.use_gpu else "cpu")
    work_dir, final_dir = Path(work_dir), Path(final_dir)
    log_dir = work_dir / "launch_logs"
    owner = plan.slurm or plan.node_rank == 0
    if owner:
        # World size, not ranks per node: the same ranks spread over other nodes compute the same.
        claim_work_dir(work_dir, run_identity(model_dir, train_data, resolved, plan.world_size, regions))
    args = [
        "--model-dir", os.fspath(model_dir), "--train-data", os.fspath(train_data),
        "--output-dir", os.fspath(work_dir), "--final-dir", os.fspath(final_dir),
        "--hparams-json", json.dumps(dict(hparams or {})),
    ]
    if family_name:
        args += ["--family", family_name]
    if regions is not None:
        args += ["--regions", os.fspath(regions)]
    if plan.nnodes == 1:
        cmd = launch_command(plan.nproc_per_node, plan.use_gpu, log_dir, args, max_restart=max_restart,
                             devices=plan.devices or None)
    else:
        master = master_endpoint(plan.master)
        if plan.slurm:
            if master.startswith("127."):
                raise ConfigError(
                    f"the master node {plan.master} resolves to the loopback address {master}, which the "
                    "other nodes cannot reach; fix the host's name resolution"
                )
            cmd = slurm_launch_command(plan, log_dir, args, master=master, max_restart=max_restart)
        else:
            cmd = launch_command(plan.nproc_per_node, plan.use_gpu, log_dir, args, max_restart=max_restart,
                                 devices=plan.devices or None, nnodes=plan.nnodes, node_rank=plan.node_rank,
                                 master=master, job_id=plan.job_id)
    print("+ " + " ".join(shlex.quote(part) for part in cmd), file=sys.stderr, flush=True)

    proc = subprocess.Popen(cmd, env=launch_env(plan.nproc_per_node, plan.use_gpu), preexec_fn=_die_with_parent)
    forwarded: list[int] = []

    def forward(signum, _frame):
        forwarded.append(signum)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if forwarded:
        raise FinetuneError(
            f"fine-tuning was interrupted by signal {forwarded[0]}; checkpoints in {work_dir} are kept "
            "and the next run resumes from the last complete one"
        )
    if code != 0:
        tails = "\n".join(f"--- {p}\n{_tail(p)}" for p in sorted(log_dir.rglob("workerlog.*")))
        print(tails, file=sys.stderr, flush=True)
        where = f"{log_dir}/workerlog.*" if plan.nnodes == 1 else f"{log_dir}/node*/workerlog.*"
        raise FinetuneError(f"fine-tuning failed (launcher exit code {code}); rank logs: {where}")
    if not owner:
        return None
    if not (final_dir / "config.json").is_file():
        raise FinetuneError(f"{final_dir}: the launcher succeeded but wrote no fine-tuned model")
    if train_log_copy is not None:
        with atomic_path(train_log_copy) as tmp:
            shutil.copyfile(work_dir / TRAIN_LOG, tmp)
    info = read_model_info(final_dir)
    if resolved["max_steps"] > 0 and info.get("global_step") != resolved["max_steps"]:
        raise FinetuneError(
            f"{final_dir}: trained to step {info.get('global_step')}, expected max_steps {resolved['max_steps']}"
        )
    return info
