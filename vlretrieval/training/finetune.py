"""The fine-tuning worker: contrastive (or the family's own) fine-tuning with the PaddleNLP Trainer,
data-parallel over ranks, and its command line.

Run one process per device through ``paddle.distributed.launch``
(:func:`~vlretrieval.training.launcher.launch_command` builds the line). On CPU the ranks talk over
gloo::

    python -m paddle.distributed.launch --nproc_per_node 2 --log_dir WORK/launch_logs --max_restart 0 \\
        PYTHON -m vlretrieval.training.finetune \\
        --model-dir INIT_MODEL_DIR --train-data LMDB_SPLIT_DIR --output-dir WORK --final-dir FINAL \\
        [--hparams-json '{"per_device_train_batch_size": 32, "max_steps": 200}'] [--device cpu]

and on GPUs the same with ``--gpus 0,1`` instead of ``--nproc_per_node 2`` (``PYTHON`` is the
interpreter's path; launch runs any non-``.py`` entry as a command, which is how ``-m`` works).
Without launch the module trains in a single process. The workflow calls
:func:`~vlretrieval.training.launcher.launch_finetune`, which builds that command, forwards
termination signals to the launcher and checks the result.

The work dir (``--output-dir``) holds the checkpoints and ``train_log.jsonl``
(:mod:`vlretrieval.training.checkpoints` describes both); a rerun resumes from the newest complete
checkpoint. The fine-tuned model is written to ``--final-dir`` atomically (temporary directory +
rename), loadable on its own through the model family.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import ConfigError
from .checkpoints import TRAIN_LOG, find_resumable_checkpoint, remove_incomplete_checkpoints
from .hparams import check_amp_device, resolve_dataloader_workers, resolve_hparams, training_arguments
from .trainer import _trainer_class, apply_freezing, make_callbacks, trainable_parameters


@dataclass
class FinetuneResult:
    global_step: int
    resumed_from: str | None
    final_dir: str
    train_log: str
    world_size: int


def resolve_device(device: str = "auto") -> str:
    """``"gpu"`` when paddle sees a CUDA device and ``device`` is ``auto``, else ``device``."""
    import paddle

    if device != "auto":
        if device not in ("cpu", "gpu"):
            raise ConfigError(f"device must be auto, cpu or gpu, got {device!r}")
        if device == "gpu" and not paddle.is_compiled_with_cuda():
            raise ConfigError("device gpu requested but this paddle build has no CUDA support")
        return device
    if paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0:
        return "gpu"
    return "cpu"


def exit_when_orphaned(poll_seconds: float = 0.5) -> threading.Thread | None:
    """Under ``paddle.distributed.launch``, end this rank when the launcher dies.

    The launcher starts every rank in its own session, so killing the launcher (SIGKILL, or a
    scheduler that signals only the job's main process) would leave ranks training and writing
    checkpoints beside the rerun. A daemon thread notices the re-parenting and exits the process.
    """
    if "PADDLE_TRAINER_ID" not in os.environ:
        return None
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(poll_seconds)
            if os.getppid() != parent:
                print(f"launcher (pid {parent}) is gone; rank {os.environ.get('PADDLE_TRAINER_ID')} exits",
                      file=sys.stderr, flush=True)
                from .losses import stop_worker_processes

                stop_worker_processes()
                os._exit(143)

    thread = threading.Thread(target=watch, name="exit-when-orphaned", daemon=True)
    thread.start()
    return thread


def _broadcast_from_rank0(value: Any) -> Any:
    import paddle.distributed as dist

    from ..models.losses import distributed_world

    _, world = distributed_world()
    if world == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def finetune(
    model_dir: str | os.PathLike,
    train_data: str | os.PathLike,
    output_dir: str | os.PathLike,
    final_dir: str | os.PathLike,
    *,
    hparams: Mapping[str, Any] | None = None,
    family_name: str | None = None,
    device: str = "auto",
    disable_tqdm: bool | None = None,
    regions: str | os.PathLike | None = None,
) -> FinetuneResult:
    """Fine-tune the model in ``model_dir`` on the serialized split ``train_data``.

    ``regions`` is the split's region store, for families that read detector regions
    (``family.extra_inputs``).

    Call once per rank (under ``paddle.distributed.launch``) or in a single process. Resumes from
    the newest complete checkpoint in ``output_dir``; writes ``final_dir`` atomically on rank 0.
    """
    import paddle
    from ..models.base import read_model_info
    from ..models.registry import get_family
    from ..models.losses import distributed_world

    exit_when_orphaned()
    hparams = resolve_hparams(hparams)
    model_dir, train_data = Path(model_dir), Path(train_data)
    output_dir, final_dir = Path(output_dir), Path(final_dir)
    device = resolve_device(device)
    paddle.set_device(device)
    check_amp_device(hparams["amp"], device)

    family = get_family(family_name or read_model_info(model_dir)["family"])
    recompute = hparams["recompute"] and family.supports_recompute
    max_len = hparams["train_max_len"] or family.train_max_len

    output_dir.mkdir(parents=True, exist_ok=True)
    from ..models.export import default_threads

    workers = resolve_dataloader_workers(
        hparams["dataloader_num_workers"], device=device, cpus=default_threads(),
        local_ranks=int(os.environ.get("PADDLE_LOCAL_SIZE", "1")),
    )
    training_args = training_arguments(
        hparams, output_dir, device=device, recompute=recompute, dataloader_num_workers=workers,
        disable_tqdm=disable_tqdm if disable_tqdm is not None else not sys.stderr.isatty(),
    )
    rank, world = distributed_world()

    tokenizer = family.load_tokenizer(model_dir)
    model = family.load_model(model_dir)
    # Before the Trainer wraps the model: DataParallel decides at construction which parameters it syncs.
    frozen = apply_freezing(model, hparams["lit"])
    model.train()
    dataset = family.training_dataset(model, tokenizer, train_data, max_len=max_len, hparams=hparams, regions=regions)
    accumulation = hparams["gradient_accumulation_steps"]
    global_batch = hparams["per_device_train_batch_size"] * world * accumulation
    if len(dataset) < global_batch:
        # paddlenlp would shrink the accumulation of a short epoch without a word.
        raise ConfigError(
            f"{train_data}: {len(dataset)} training pairs cannot fill one global batch of {global_batch} "
            f"({hparams['per_device_train_batch_size']} per rank x {world} ranks x {accumulation} accumulated); "
            "lower per_device_train_batch_size or gradient_accumulation_steps"
        )

    resume = None
    if rank == 0:
        resume = find_resumable_checkpoint(output_dir)
        remove_incomplete_checkpoints(output_dir)
    resume = _broadcast_from_rank0(str(resume) if resume is not None else None)
    resume_path = Path(resume) if resume is not None else None

    run_info = {
        "world_size": world,
        "per_device_batch_size": hparams["per_device_train_batch_size"],
        "global_batch_size": global_batch,
        "gradient_accumulation_steps": accumulation,
        "train_pairs": len(dataset),
        "device": device,
        "dataloader_num_workers": workers,
        "family": family.name,
        "recompute": recompute,
        "train_max_len": max_len,
        "frozen_parameters": len(frozen),
        "trainable_parameters": len(trainable_parameters(model)),
        "hparams": hparams,
    }
    trainer_cls = _trainer_class()
    trainer = trainer_cls(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=family.training_collator(tokenizer, model, max_len=max_len),
        tokenizer=tokenizer,
        callbacks=make_callbacks(
            output_dir / TRAIN_LOG, model_dir=model_dir, resumed_from=resume_path, run_info=run_info
        ),
        gather_with_grad=hparams["gather_with_grad"],
        lr_multipliers=hparams["lr_multipliers"],
    )
    trainer.train(resume_from_checkpoint=resume)

    if rank == 0:
        if hparams["amp"] and hparams["amp"]["level"] == "O2":
            # O2 decorated the weights to half precision (the optimizer kept float32 masters); the
            # saved model is float32 like every other, so CPU evaluation and export can load it.
            trainer.model.to(dtype="float32")
        family.save_atomic(
            trainer.model,
            tokenizer,
            final_dir,
            extra_info={
                "fine_tuned_from": str(model_dir),
                "train_data": str(train_data),
                "global_step": int(trainer.state.global_step),
                "hparams": hparams,
            },
        )
    if world > 1 and rank != 0:
        # Not a gloo barrier: it times out after about 30 s, less than rank 0 takes to save a
        # published-size model on a busy CPU. The final directory appears by an atomic rename, and
        # the launcher stops every rank if rank 0 fails.
        while not Path(final_dir).is_dir():
            time.sleep(1.0)
    return FinetuneResult(
        global_step=int(trainer.state.global_step),
        resumed_from=resume,
        final_dir=str(final_dir),
        train_log=str(output_dir / TRAIN_LOG),
        world_size=world,
    )


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m vlretrieval.training.finetune",
        description="Fine-tuning of a model family with its own loss (run under paddle.distributed.launch for several ranks).",
    )
    parser.add_argument("--model-dir", required=True, type=Path, help="initial model directory (prepare_initial_model)")
    parser.add_argument("--train-data", required=True, type=Path, help="serialized training split (LMDB directory)")
    parser.add_argument("--output-dir", required=True, type=Path, help="work dir: checkpoints and train_log.jsonl")
    parser.add_argument("--final-dir", required=True, type=Path, help="where the fine-tuned model is saved")
    parser.add_argument("--hparams-json", default=None, help="JSON object overriding DEFAULT_HPARAMS")
    parser.add_argument("--family", default=None, help="model family (default: from the model directory)")
    parser.add_argument("--regions", default=None, type=Path, help="region store of the training split (region families)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu"))
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        overrides = json.loads(args.hparams_json) if args.hparams_json else {}
    except ValueError as exc:
        print(f"error: --hparams-json is not valid JSON: {exc}", file=sys.stderr)
        return 2
    if not isinstance(overrides, dict):
        print("error: --hparams-json must be a JSON object", file=sys.stderr)
        return 2
    try:
        result = finetune(
            args.model_dir,
            args.train_data,
            args.output_dir,
            args.final_dir,
            hparams=overrides,
            family_name=args.family,
            device=args.device,
            regions=args.regions,
        )
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from ..models.losses import distributed_world
    from .losses import exit_after_peers

    rank, world_size = distributed_world()
    if rank == 0:
        print(json.dumps({"finetune": result.__dict__}), flush=True)
    if world_size > 1:
        exit_after_peers()
    return 0


if __name__ == "__main__":
    sys.exit(main())
