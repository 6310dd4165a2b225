"""Contrastive fine-tuning of a dual encoder with the PaddleNLP Trainer, data-parallel over ranks.

Run one process per device through ``paddle.distributed.launch`` (:func:`launch_command` builds the
line). On CPU the ranks talk over gloo::

    python -m paddle.distributed.launch --nproc_per_node 2 --log_dir WORK/launch_logs --max_restart 0 \\
        PYTHON -m vlretrieval.training.finetune \\
        --model-dir INIT_MODEL_DIR --train-data LMDB_SPLIT_DIR --output-dir WORK --final-dir FINAL \\
        [--hparams-json '{"per_device_train_batch_size": 32, "max_steps": 200}'] [--device cpu]

and on GPUs the same with ``--gpus 0,1`` instead of ``--nproc_per_node 2`` (``PYTHON`` is the
interpreter's path; launch runs any non-``.py`` entry as a command, which is how ``-m`` works).
Without launch the module trains in a single process. The workflow calls :func:`launch_finetune`,
which builds that command, forwards termination signals to the launcher and checks the result.

:func:`resolve_launch_plan` decides the ranks from the config and the environment: one per GPU the
node shows (``CUDA_VISIBLE_DEVICES`` or SLURM's GPU variables) or the configured CPU ranks, and the
nodes. On several nodes every node runs its own launcher with ``--nnodes N --master IP:PORT --rank
NODE``; in a SLURM job of several nodes the batch step starts them all with one ``srun``
(:func:`slurm_launch_command`), and by hand each node is started with its own node rank.

What a run leaves in the work dir (``--output-dir``):

* ``checkpoint-<step>/``: Trainer checkpoints every ``save_steps`` (weights, optimizer, scheduler,
  RNG, ``trainer_state.json``, tokenizer) plus :data:`CHECKPOINT_MARKER`, written last, which lists
  the files and sizes. Only checkpoints whose marker matches their files count as complete.
* ``train_log.jsonl``: one JSON object per line, written by rank 0 only. Every record has ``event``,
  ``step`` (global step) and ``time`` (unix seconds):

  - ``start`` / ``resume``: run facts (``world_size``, ``per_device_batch_size``,
    ``global_batch_size`` (pairs per optimizer step), ``gradient_accumulation_steps``,
    ``train_pairs``, ``max_steps``, ``hparams``; ``checkpoint`` on a resume);
  - ``train``, one per logging step: ``loss`` (mean over ranks of the local losses, which is the
    CLIP loss of the global batch), ``lr`` (the rate the optimizer applied in that step),
    ``logit_scale``, ``samples_per_second`` (global samples over the logging interval), ``epoch``;
    for families whose loss is a sum of parts (BridgeTower: ``itc`` + ``itm``), ``loss_parts``,
    each averaged the same way;
  - ``end``: ``train_runtime``, ``train_samples_per_second``, ``mean_loss`` over this run's steps.

A rerun after a kill resumes from the newest complete checkpoint (model, optimizer, scheduler, data
position and RNG), deletes incomplete ones, and truncates ``train_log.jsonl`` to the resumed step so
no step is logged twice. The fine-tuned model is written to ``--final-dir`` atomically (temporary
directory + rename), loadable on its own through the model family.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import operator
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from ..errors import ConfigError, VLRetrievalError
from ..io import atomic_directory, atomic_open, atomic_path

_log = logging.getLogger(__name__)

TRAIN_LOG = "train_log.jsonl"
#: Keys of the Trainer's logs that carry a family's loss parts (``training_loss_parts``).
LOSS_PART_PREFIX = "loss_part_"
CHECKPOINT_MARKER = "vlretrieval_checkpoint.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")

#: The ERNIE-ViL 2.0 Flickr30k-CN recipe (PaddleNLP ``model_zoo/ernie-vil2.0``), overridable per run.
DEFAULT_HPARAMS: dict[str, Any] = {
    "learning_rate": 5e-5,
    "warmup_steps": 100,
    # A fraction of all steps, as BridgeTower's recipes give it (0.05 on Flickr30k). As in
    # paddlenlp, warmup_steps > 0 takes precedence: a model entry with a ratio sets warmup_steps: 0,
    # and a pair override that sets warmup_steps again replaces the ratio.
    "warmup_ratio": 0.0,
    "per_device_train_batch_size": 128,
    # Micro-batches per optimizer step. The contrastive loss and its negatives see one micro-batch
    # of every rank at a time (as in BridgeTower's recipe, which reaches 512 with 8 per GPU).
    "gradient_accumulation_steps": 1,
    "num_train_epochs": 5,
    "max_steps": -1,  # > 0 overrides num_train_epochs
    "weight_decay": 0.001,
    "lr_scheduler_type": "cosine",
    "max_grad_norm": 1.0,
    "recompute": True,  # applied only when the family supports it
    "train_max_len": None,  # None: the family's default (32 for ERNIE-ViL)
    "hflip": True,  # reference augmentation; turn off for captions that say left/right (the demo)
    # Area range of the random resized crop; null keeps the family's (0.9 to 1, ERNIE-ViL 2.0's).
    "crop_scale": None,
    # {num_ops, magnitude}: BridgeTower's (ViLT's) RandAugment after the flip (its recipe: 2 at 7 of 30).
    "randaugment": None,
    # The reference gathers without gradient, which makes the multi-rank gradient only an
    # approximation of the global-batch one (and a from-scratch run stalls); with it the two are equal.
    "gather_with_grad": True,
    # LiT (locked-image text tuning): true freezes the model's image tower, false trains it, null
    # keeps what the model directory says (BertCLIP locks by default, ERNIE-ViL has no lock).
    "lit": None,
    "seed": 1,
    "logging_steps": 1,
    "save_steps": 500,
    "save_total_limit": 3,  # 0 keeps every checkpoint
    "dataloader_num_workers": 0,
    # Cross encoders trained on ITM (VinVL): each positive's negative is the one of this many random
    # swaps that the model scores highest at that step; 1 is the reference's random negative.
    "itm_negative_candidates": 1,
    # Multipliers of the scheduled learning rate for the model's named parameter groups
    # (``lr_parameter_groups``), e.g. BridgeTower's {cross_modal: 5, heads: 5}; the rest trains at 1.
    "lr_multipliers": {},
}


# --------------------------------------------------------------------------------------------------
# Hyperparameters
# --------------------------------------------------------------------------------------------------


def resolve_hparams(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """:data:`DEFAULT_HPARAMS` updated with ``overrides``; unknown keys and bad values raise ConfigError."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(DEFAULT_HPARAMS))
    if unknown:
        raise ConfigError(f"unknown fine-tuning hyperparameter(s) {unknown}; known: {sorted(DEFAULT_HPARAMS)}")
    hparams = {**DEFAULT_HPARAMS, **overrides}
    positive_ints = ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps", "save_steps")
    for key in positive_ints:
        if not isinstance(hparams[key], int) or hparams[key] < 1:
            raise ConfigError(f"hyperparameter {key} must be a positive integer, got {hparams[key]!r}")
    for key in ("warmup_steps", "dataloader_num_workers"):
        if not isinstance(hparams[key], int) or hparams[key] < 0:
            raise ConfigError(f"hyperparameter {key} must be a non-negative integer, got {hparams[key]!r}")
    limit = hparams["save_total_limit"]
    if not isinstance(limit, int) or limit < 0 or limit == 1:
        # The Trainer deletes the previous checkpoint before the new one is marked complete, so
        # keeping a single checkpoint leaves a window in which a kill leaves nothing to resume from.
        raise ConfigError(f"hyperparameter save_total_limit must be 0 (keep all) or >= 2, got {limit!r}")
    if not isinstance(hparams["max_steps"], int) or (hparams["max_steps"] <= 0 and hparams["max_steps"] != -1):
        raise ConfigError(f"hyperparameter max_steps must be a positive integer or -1, got {hparams['max_steps']!r}")
    for key in ("learning_rate", "num_train_epochs"):
        if not isinstance(hparams[key], (int, float)) or hparams[key] <= 0:
            raise ConfigError(f"hyperparameter {key} must be a positive number, got {hparams[key]!r}")
    ratio = hparams["warmup_ratio"]
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise ConfigError(f"hyperparameter warmup_ratio must be a number in [0, 1), got {ratio!r}")
    crop = hparams["crop_scale"]
    if crop is not None and not (
        isinstance(crop, (list, tuple)) and len(crop) == 2
        and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in crop)
        and 0 < crop[0] <= crop[1] <= 1
    ):
        raise ConfigError(f"hyperparameter crop_scale must be null or [low, high] with 0 < low <= high <= 1, got {crop!r}")
    from ..models.randaugment import randaugment_from

    randaugment_from(hparams["randaugment"])
    for key in ("weight_decay", "max_grad_norm"):
        if not isinstance(hparams[key], (int, float)) or hparams[key] < 0:
            raise ConfigError(f"hyperparameter {key} must be a non-negative number, got {hparams[key]!r}")
    for key in ("recompute", "hflip", "gather_with_grad"):
        if not isinstance(hparams[key], bool):
            raise ConfigError(f"hyperparameter {key} must be true or false, got {hparams[key]!r}")
    candidates = hparams["itm_negative_candidates"]
    if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
        raise ConfigError(f"hyperparameter itm_negative_candidates must be a positive integer, got {hparams['itm_negative_candidates']!r}")
    multipliers = hparams["lr_multipliers"]
    if not isinstance(multipliers, Mapping) or not all(
        isinstance(group, str) and isinstance(rate, (int, float)) and not isinstance(rate, bool) and rate > 0
        for group, rate in multipliers.items()
    ):
        raise ConfigError(
            f"hyperparameter lr_multipliers must map parameter group names to positive numbers, got {multipliers!r}"
        )
    hparams["lr_multipliers"] = {group: float(rate) for group, rate in sorted(multipliers.items())}
    if hparams["lit"] is not None and not isinstance(hparams["lit"], bool):
        raise ConfigError(f"hyperparameter lit must be true, false or null, got {hparams['lit']!r}")
    if hparams["train_max_len"] is not None and (not isinstance(hparams["train_max_len"], int) or hparams["train_max_len"] < 2):
        raise ConfigError(f"hyperparameter train_max_len must be an integer >= 2 or null, got {hparams['train_max_len']!r}")
    return hparams


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------


def _checkpoint_step(path: Path) -> int | None:
    match = _CHECKPOINT_RE.match(path.name)
    return int(match.group(1)) if match and path.is_dir() else None


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``checkpoint-<step>`` directory, newest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for child in output_dir.iterdir():
        try:
            step = _checkpoint_step(child)
        except OSError:  # removed while listing
            continue
        if step is not None:
            found.append((step, child))
    return sorted(found, reverse=True)


def write_checkpoint_marker(checkpoint_dir: str | os.PathLike, global_step: int) -> Path:
    """Record the files of a finished checkpoint; their presence and sizes define completeness."""
    checkpoint_dir = Path(checkpoint_dir)
    files = {
        str(path.relative_to(checkpoint_dir)): path.stat().st_size
        for path in sorted(checkpoint_dir.rglob("*"))
        if path.is_file() and path.name != CHECKPOINT_MARKER
    }
    marker = checkpoint_dir / CHECKPOINT_MARKER
    with atomic_open(marker) as handle:
        json.dump({"global_step": int(global_step), "files": files}, handle, indent=1)
    return marker


def is_complete_checkpoint(checkpoint_dir: str | os.PathLike) -> bool:
    """True when the marker exists, names the trainer state, and every listed file has its recorded size."""
    checkpoint_dir = Path(checkpoint_dir)
    try:
        with open(checkpoint_dir / CHECKPOINT_MARKER, "r", encoding="utf-8") as handle:
            marker = json.load(handle)
        files = marker["files"]
        if "trainer_state.json" not in files:
            return False
        return all((checkpoint_dir / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def find_resumable_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in ``output_dir``, or None."""
    for _, path in list_checkpoints(output_dir):
        if is_complete_checkpoint(path):
            return path
    return None


def remove_incomplete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Delete the checkpoints a killed run left half-written; returns their paths.

    Otherwise a later save into the same ``checkpoint-<step>`` name would mix old and new files, and
    checkpoint rotation would count them.
    """
    removed = []
    for _, path in list_checkpoints(output_dir):
        if not is_complete_checkpoint(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


# --------------------------------------------------------------------------------------------------
# Metrics log
# --------------------------------------------------------------------------------------------------


def iter_train_log(path: str | os.PathLike, *, strict: bool = False) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``("path:line", record)`` for each record of a ``train_log.jsonl``.

    The log is appended one line at a time, so a kill can leave the last line unfinished; that line is
    skipped. Any other line that is not a JSON object raises :class:`DataError` with ``strict`` and is
    skipped otherwise. A missing file raises ``FileNotFoundError``.
    """
    from ..errors import DataError

    with open(path, "r", encoding="utf-8") as handle:
        lines = handle.readlines()
    for line_no, line in enumerate(lines, start=1):
        where = f"{path}:{line_no}"
        if not line.endswith("\n") and line_no == len(lines):
            _log.warning("%s: last line is incomplete (a killed writer); it is skipped", where)
            break
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            record, problem = None, f"invalid JSON: {exc}"
        else:
            problem = None if isinstance(record, dict) else f"expected a JSON object, found {type(record).__name__}"
        if problem is not None:
            if strict:
                raise DataError(where, problem)
            continue
        yield where, record


def read_train_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every readable record of a ``train_log.jsonl`` (none when the file does not exist yet)."""
    try:
        return [record for _, record in iter_train_log(path)]
    except FileNotFoundError:
        return []


def truncate_train_log(path: str | os.PathLike, last_step: int) -> None:
    """Keep the steps up to ``last_step`` (atomically), so resumed steps are not logged twice.

    Other events (start, resume, end) are kept only before ``last_step``: the run that resumes there
    writes its own, and an earlier attempt's events at that step would appear twice.
    """
    path = Path(path)
    if not path.exists():
        return

    def keep(record: dict) -> bool:
        step = int(record.get("step", 0))
        return step <= last_step if record.get("event") == "train" else step < last_step

    kept = [r for r in read_train_log(path) if keep(r)]
    with atomic_open(path) as handle:
        for record in kept:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def _trainer_callback_base():
    from paddlenlp.trainer import TrainerCallback

    return TrainerCallback


def _is_world_zero(state) -> bool:
    return bool(getattr(state, "is_world_process_zero", True))


def make_callbacks(train_log: Path, *, model_dir: Path, resumed_from: Path | None, run_info: dict[str, Any]):
    """The callbacks of a fine-tuning run: metrics log, temperature clamp, checkpoint marker."""
    import paddle
    import paddle.distributed as dist

    from ..models.base import MODEL_INFO_FILE
    from .losses import distributed_world

    base = _trainer_callback_base()
    # Copied into every checkpoint so that one can be evaluated like a saved model directory.
    model_dir_extras = [model_dir / name for name in (MODEL_INFO_FILE, "preprocessor_config.json")]

    class JsonlMetricsCallback(base):
        """Appends the records described in the module docstring to ``train_log.jsonl`` (rank 0)."""

        def __init__(self):
            self._lr: float | None = None
            self._losses: list[float] = []

        def _write(self, record: dict[str, Any]) -> None:
            record.setdefault("time", round(time.time(), 3))
            with open(train_log, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")

        def on_train_begin(self, args, state, control, **kwargs):
            if not _is_world_zero(state):
                return
            train_log.parent.mkdir(parents=True, exist_ok=True)
            truncate_train_log(train_log, state.global_step)
            event = {"event": "resume" if resumed_from is not None else "start", "step": int(state.global_step)}
            if resumed_from is not None:
                event["checkpoint"] = resumed_from.name
            event.update(run_info)
            event["max_steps"] = int(state.max_steps)
            self._write(event)

        def on_step_begin(self, args, state, control, lr_scheduler=None, optimizer=None, **kwargs):
            # Read before the step: the Trainer advances the scheduler right after the optimizer step,
            # so at logging time it already reports the next step's rate.
            if lr_scheduler is not None:
                self._lr = float(lr_scheduler.get_lr())
            elif optimizer is not None:
                self._lr = float(optimizer.get_lr())

        def on_log(self, args, state, control, logs=None, model=None, **kwargs):
            if not _is_world_zero(state) or not logs:
                return
            if "loss" in logs:
                record = {
                    "event": "train",
                    "step": int(state.global_step),
                    "epoch": round(float(state.epoch or 0.0), 6),
                    "loss": float(logs["loss"]),
                    "lr": self._lr if self._lr is not None else float(logs.get("learning_rate", float("nan"))),
                    "samples_per_second": logs.get("interval_samples_per_second"),
                    "steps_per_second": logs.get("interval_steps_per_second"),
                }
                if model is not None and hasattr(model, "logit_scale"):
                    with paddle.no_grad():
                        record["logit_scale"] = float(model.logit_scale().reshape([-1])[0])
                parts = {key[len(LOSS_PART_PREFIX):]: float(value) for key, value in logs.items()
                         if key.startswith(LOSS_PART_PREFIX)}
                if parts:
                    record["loss_parts"] = parts
                self._losses.append(record["loss"])
                self._write(record)
            elif "train_runtime" in logs:
                record = {"event": "end", "step": int(state.global_step)}
                for key in ("train_runtime", "train_samples_per_second", "train_steps_per_second"):
                    if key in logs:
                        record[key] = float(logs[key])
                # The Trainer's own train_loss divides by all steps, including those done before a
                # resume; this is the mean over the steps this run trained and logged.
                if self._losses:
                    record["mean_loss"] = sum(self._losses) / len(self._losses)
                self._write(record)

    class LogitScaleClampCallback(base):
        """Clamps the learnable temperature in place after every optimizer step (1 <= scale <= 100)."""

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if model is not None and hasattr(model, "clamp_logit_scale_"):
                model.clamp_logit_scale_()

    class CheckpointMarkerCallback(base):
        """Writes :data:`CHECKPOINT_MARKER` once every rank has finished saving a checkpoint."""

        def on_save(self, args, state, control, **kwargs):
            _, world = distributed_world()
            if world > 1:
                dist.barrier()
            if _is_world_zero(state):
                checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if checkpoint.is_dir():
                    for extra in model_dir_extras:
                        if extra.is_file() and not (checkpoint / extra.name).exists():
                            shutil.copyfile(extra, checkpoint / extra.name)
                    write_checkpoint_marker(checkpoint, state.global_step)
            if world > 1:
                dist.barrier()

    return [JsonlMetricsCallback(), LogitScaleClampCallback(), CheckpointMarkerCallback()]


# --------------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------------


def _trainer_class():
    import paddle
    from paddlenlp.trainer import Trainer

    class RetrievalTrainer(Trainer):
        """Trainer whose loss is the model's own ``training_loss`` of its ``forward`` output.

        Dual encoders return local features (:class:`~vlretrieval.models.base.DualEncoderOutput`) and
        gather them once, in the contrastive loss, for cross-batch negatives over all ranks; cross
        encoders return matching logits with their labels. No evaluation metric: retrieval is scored
        by the evaluation stage, on held-out data.
        """

        def __init__(self, *args, gather_with_grad: bool = False, lr_multipliers: Mapping[str, float] | None = None,
                     **kwargs):
            super().__init__(*args, **kwargs)
            self.gather_with_grad = gather_with_grad
            self.lr_multipliers = dict(lr_multipliers or {})
            # Loss parts of the micro-batches since the last log, and their means over ranks then.
            self._part_sums: dict[str, float] = {}
            self._part_batches = 0
            self._logged_parts: dict[str, float] | None = None

        def compute_loss(self, model, inputs, return_outputs=False):
            output = model(**inputs)
            # The family's own loss (self.model is the unwrapped model; `model` may be DataParallel).
            parts_of = getattr(self.model, "training_loss_parts", None)
            if parts_of is None:
                loss = self.model.training_loss(output, gather_with_grad=self.gather_with_grad)
            else:
                # A loss made of parts is their sum (the family's training_loss), computed once.
                parts = parts_of(output, gather_with_grad=self.gather_with_grad)
                loss = functools.reduce(operator.add, parts.values())
                for name, value in parts.items():
                    self._part_sums[name] = self._part_sums.get(name, 0.0) + float(value)
                self._part_batches += 1
            return (loss, output) if return_outputs else loss

        def _maybe_log_save_evaluate(self, tr_loss, model, epoch, ignore_keys_for_eval, **kwargs):
            # Every rank logs at the same steps (the Trainer gathers its loss here too), so the parts
            # are averaged over ranks the same way, before the Trainer writes its logs.
            if self.control.should_log and self._part_batches:
                names = sorted(self._part_sums)
                local = paddle.to_tensor([self._part_sums[name] / self._part_batches for name in names], dtype="float32")
                means = self._nested_gather(local).reshape([-1, len(names)]).mean(axis=0).numpy()
                self._logged_parts = {name: round(float(value), 8) for name, value in zip(names, means)}
                self._part_sums, self._part_batches = {}, 0
            return super()._maybe_log_save_evaluate(tr_loss, model, epoch, ignore_keys_for_eval, **kwargs)

        def log(self, logs, **kwargs):
            if "loss" in logs and self._logged_parts is not None:
                logs = {**logs, **{f"{LOSS_PART_PREFIX}{name}": value for name, value in self._logged_parts.items()}}
                self._logged_parts = None
            return super().log(logs, **kwargs)

        def create_optimizer(self, lr_scheduler=None):
            if self.optimizer is None:
                no_decay = set(getattr(self.model, "no_weight_decay_names", lambda: set())())
                # Frozen parameters get no optimizer state at all (no moments, no decay), so a
                # checkpoint holds none for them and the optimizer cannot move them.
                trainable = trainable_parameters(self.model)
                apply_learning_rate_multipliers(self.model, trainable, self.lr_multipliers)
                decay_names = {
                    param.name
                    for name, param in trainable
                    if not any(part in name for part in ("bias", "norm")) and name not in no_decay
                }
                optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args)
                self.optimizer = optimizer_cls(
                    learning_rate=self.lr_scheduler if lr_scheduler is None else lr_scheduler,
                    apply_decay_param_fun=lambda name: name in decay_names,
                    parameters=[param for _, param in trainable],
                    weight_decay=self.args.weight_decay,
                    grad_clip=paddle.nn.ClipGradByGlobalNorm(self.args.max_grad_norm)
                    if self.args.max_grad_norm > 0
                    else None,
                    **optimizer_kwargs,
                )
            return self.optimizer

    return RetrievalTrainer


def apply_freezing(model, lit: bool | None = None) -> set[str]:
    """Freeze what the model asks to be frozen; returns those parameter names.

    ``lit`` true/false locks or unlocks the image tower of a model that has one
    (``set_image_tower_locked``); ``None`` keeps the model's own setting. The model names its frozen
    parameters (``frozen_parameter_names``); they get ``stop_gradient``, which also keeps them out of
    ``paddle.DataParallel``'s gradient all-reduce (it only registers trainable parameters).
    """
    if lit is not None:
        lock = getattr(model, "set_image_tower_locked", None)
        if lock is not None:
            lock(lit)
        elif lit:
            raise ConfigError(f"{type(model).__name__} has no image tower to lock; remove 'lit: true' from its recipe")
    frozen = set(getattr(model, "frozen_parameter_names", lambda: set())())
    known = {name for name, _ in model.named_parameters()}
    if frozen - known:
        raise ConfigError(f"{type(model).__name__} names unknown frozen parameters {sorted(frozen - known)[:5]}")
    for name, param in model.named_parameters():
        if name in frozen:
            param.stop_gradient = True
    return frozen


def trainable_parameters(model) -> list[tuple[str, Any]]:
    """``(name, parameter)`` of every parameter that trains: not frozen by the model, not stop_gradient."""
    frozen = set(getattr(model, "frozen_parameter_names", lambda: set())())
    return [(name, param) for name, param in model.named_parameters() if name not in frozen and not param.stop_gradient]


def apply_learning_rate_multipliers(model, trainable: Sequence[tuple[str, Any]],
                                    multipliers: Mapping[str, float]) -> dict[str, float]:
    """Set each trainable parameter's multiplier of the scheduled learning rate: the parameters of
    each named group of the model (``model.lr_parameter_groups()``: group name -> parameter-name
    prefixes) whose multiplier is given train at that multiple, all others at 1. Returns the
    multipliers other than 1 by parameter name.

    paddle's optimizers scale the rate by ``param.optimize_attr["learning_rate"]``; setting it on the
    parameters, rather than passing parameter groups, keeps gradient clipping global (paddle clips
    each group on its own). A group the model does not define, a given group that holds no trainable
    parameter, or a parameter in two given groups is a :class:`ConfigError`: a silently ignored
    multiplier would change the recipe unnoticed.
    """
    defined = dict(getattr(model, "lr_parameter_groups", lambda: {})())
    unknown = sorted(set(multipliers) - set(defined))
    if unknown:
        raise ConfigError(
            f"lr_multipliers names parameter group(s) {unknown} that {type(model).__name__} does not define; "
            f"it defines {sorted(defined) or 'none'}"
        )
    rate_of: dict[str, tuple[str, float]] = {}
    for group, rate in multipliers.items():
        prefixes = tuple(defined[group])
        members = [name for name, _ in trainable if any(name == p or name.startswith(p + ".") for p in prefixes)]
        if not members:
            raise ConfigError(f"lr_multipliers group {group!r} holds no trainable parameter of {type(model).__name__}")
        for name in members:
            if name in rate_of:
                raise ConfigError(f"parameter {name} is in lr_multipliers groups {rate_of[name][0]!r} and {group!r}")
            rate_of[name] = (group, float(rate))
    for name, param in trainable:
        param.optimize_attr["learning_rate"] = rate_of.get(name, ("", 1.0))[1]
    return {name: rate for name, (_, rate) in rate_of.items() if rate != 1.0}


# --------------------------------------------------------------------------------------------------
# Initial model
# --------------------------------------------------------------------------------------------------


def vocab_texts_from_split(split_dir: str | os.PathLike) -> list[str]:
    """Every caption of a serialized split, in file order (input for a tiny model's vocabulary)."""
    from .data import release_store, shared_store

    texts = [record.text for record in shared_store(split_dir).texts()]
    release_store(split_dir)
    return texts


def training_arguments(
    hparams: Mapping[str, Any], output_dir: str | os.PathLike, *, device: str, recompute: bool, disable_tqdm: bool = True
):
    """paddlenlp ``TrainingArguments`` of a fine-tuning run from resolved hyperparameters."""
    from paddlenlp.trainer import TrainingArguments

    return TrainingArguments(
        output_dir=str(output_dir),
        device=device,
        do_train=True,
        do_eval=False,
        per_device_train_batch_size=hparams["per_device_train_batch_size"],
        gradient_accumulation_steps=hparams["gradient_accumulation_steps"],
        learning_rate=hparams["learning_rate"],
        warmup_steps=hparams["warmup_steps"],
        warmup_ratio=hparams["warmup_ratio"],
        num_train_epochs=hparams["num_train_epochs"],
        max_steps=hparams["max_steps"],
        weight_decay=hparams["weight_decay"],
        lr_scheduler_type=hparams["lr_scheduler_type"],
        max_grad_norm=hparams["max_grad_norm"],
        recompute=recompute,
        seed=hparams["seed"],
        logging_strategy="steps",
        logging_steps=hparams["logging_steps"],
        save_strategy="steps",
        save_steps=hparams["save_steps"],
        save_total_limit=hparams["save_total_limit"] or None,
        dataloader_num_workers=hparams["dataloader_num_workers"],
        # Cross-batch negatives need the same local batch size on every rank.
        dataloader_drop_last=True,
        remove_unused_columns=False,
        report_to=["none"],
        disable_tqdm=disable_tqdm,
    )


def prepare_initial_model(
    family_name: str,
    init: str | Mapping[str, str],
    out_dir: str | os.PathLike,
    *,
    vocab_texts: Iterable[str] | None = None,
    seed: int = 0,
    tiny_overrides: Mapping[str, Any] | None = None,
    vocab_min_count: int = 1,
    pretrain: Mapping[str, Any] | None = None,
    train_data: str | os.PathLike | None = None,
    regions: str | os.PathLike | None = None,
    image_size: int | None = None,
) -> Path:
    """Write the starting model directory of a fine-tuning run, atomically.

    ``init`` is ``"tiny"`` (random weights from ``seed``, vocabulary built from ``vocab_texts``),
    a pretrained name, a local model directory, or a mapping from tower to a pretrained name or
    directory (``{"vision": ..., "text": ...}``) for families assembled from separately pretrained
    towers (``family.load_towers``; new weights such as projections come from ``seed``). The result
    reloads offline with ``family.load_model(out_dir)`` / ``family.load_tokenizer(out_dir)``.

    With ``image_size`` the model is first set to read images of that size (``family.with_image_size``:
    BridgeTower resamples its position table, as its authors fine-tune at 384 px from 288 px weights);
    the info file records both sizes.

    With ``pretrain`` (a model entry's ``pretrain`` settings) the model is then pretrained on
    ``train_data`` (and its ``regions``) with the family's pretraining objective before it is saved
    (:mod:`vlretrieval.training.pretrain`); the info file records the run.
    """
    from ..models.registry import get_family
    from ..models.vocab import build_vocab_file

    family = get_family(family_name)
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        if init == "tiny":
            if vocab_texts is None:
                raise ConfigError(f"init 'tiny' for {family_name} needs vocab_texts to build its vocabulary")
            # The vocabulary is written inside the staging directory, so the tokenizer's save
            # finds its source file there and the final rename carries it along.
            tokens = build_vocab_file(vocab_texts, tmp / "vocab.txt", min_count=vocab_min_count)
            model, tokenizer = family.build_tiny(tmp / "vocab.txt", seed=seed, **dict(tiny_overrides or {}))
            info = {"init": "tiny", "seed": int(seed), "tiny_overrides": dict(tiny_overrides or {}), "vocab_tokens": len(tokens)}
        elif isinstance(init, Mapping):
            if tiny_overrides:
                raise ConfigError("tiny_overrides only apply to init 'tiny'")
            load_towers = getattr(family, "load_towers", None)
            if load_towers is None:
                raise ConfigError(
                    f"{family_name} cannot be assembled from separate towers {sorted(init)}; "
                    "give init one pretrained name or model directory"
                )
            towers = {str(key): os.fspath(value) for key, value in init.items()}
            model, tokenizer = load_towers(towers, seed=seed)
            info = {"init": towers, "seed": int(seed)}
        elif isinstance(init, (str, os.PathLike)):
            if tiny_overrides:
                raise ConfigError("tiny_overrides only apply to init 'tiny'")
            model = family.load_model(init)
            tokenizer = family.load_tokenizer(init)
            info = {"init": os.fspath(init)}
        else:
            raise ConfigError(f"init must be 'tiny', a pretrained name, a directory or a mapping of towers, got {init!r}")
        if image_size is not None:
            before = family.image_size(model)
            model = family.with_image_size(model, image_size)
            info["image_resize"] = {"from": before, "to": family.image_size(model)}
        if pretrain is not None:
            if train_data is None:
                raise ConfigError(f"pretraining {family_name} needs the training split (train_data)")
            info["pretrain"] = family.pretrain(model, tokenizer, train_data, settings=pretrain, regions=regions)
        family.save(model, tokenizer, tmp, extra_info=info)
    return out_dir


# --------------------------------------------------------------------------------------------------
# Fine-tuning
# --------------------------------------------------------------------------------------------------


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


def exit_when_orphaned(poll_seconds: float = 2.0) -> threading.Thread | None:
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
                os._exit(143)

    thread = threading.Thread(target=watch, name="exit-when-orphaned", daemon=True)
    thread.start()
    return thread


def _broadcast_from_rank0(value: Any) -> Any:
    import paddle.distributed as dist

    from .losses import distributed_world

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
    import paddle.distributed as dist
    from ..models.base import read_model_info
    from ..models.registry import get_family
    from .losses import distributed_world

    exit_when_orphaned()
    hparams = resolve_hparams(hparams)
    model_dir, train_data = Path(model_dir), Path(train_data)
    output_dir, final_dir = Path(output_dir), Path(final_dir)
    device = resolve_device(device)
    paddle.set_device(device)

    family = get_family(family_name or read_model_info(model_dir)["family"])
    recompute = hparams["recompute"] and family.supports_recompute
    max_len = hparams["train_max_len"] or family.train_max_len

    output_dir.mkdir(parents=True, exist_ok=True)
    training_args = training_arguments(
        hparams, output_dir, device=device, recompute=recompute,
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
    if world > 1:
        dist.barrier()
    return FinetuneResult(
        global_step=int(trainer.state.global_step),
        resumed_from=resume,
        final_dir=str(final_dir),
        train_log=str(output_dir / TRAIN_LOG),
        world_size=world,
    )


# --------------------------------------------------------------------------------------------------
# Launching
# --------------------------------------------------------------------------------------------------


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
    """The ``paddle.distributed.launch`` command line that runs this module on ``n_ranks`` ranks of a node.

    ``args`` are this module's own arguments (``--model-dir ... --final-dir ...``). CPU ranks are
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


# --------------------------------------------------------------------------------------------------
# Launch plan: ranks per node, nodes
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LaunchPlan:
    """Where the ranks of a fine-tuning run go: ``nproc_per_node`` ranks on each of ``nnodes`` nodes.

    ``devices`` are the GPU labels of this node (empty on CPU). With several nodes, ``master`` is the
    rendezvous ``host:port`` (node 0's), ``node_rank`` this node's index, and ``slurm`` says that
    this process runs in the SLURM batch step on the first node and starts every node's launcher
    itself with ``srun`` (``node_rank`` is then each node's ``SLURM_NODEID``).
    """

    nproc_per_node: int
    use_gpu: bool
    devices: tuple[str, ...] = ()
    nnodes: int = 1
    node_rank: int = 0
    master: str | None = None
    hosts: tuple[str, ...] = ()
    slurm: bool = False
    job_id: str | None = None

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


#: Default rendezvous port of a multi-node SLURM job: this plus the job id modulo 20000, so jobs
#: that share a first node are unlikely to collide and every node computes the same port.
SLURM_MASTER_PORT_BASE = 29500


def expand_hostlist(text: str) -> list[str]:
    """The host names of a SLURM host list: ``node[01-03,07],gpu-a[1-2]-x`` -> node01, ..., gpu-a2-x.

    Handles the forms ``scontrol show hostnames`` expands: comma-separated entries, each with any
    number of bracket groups of numbers and zero-padded ranges. Raises ValueError on anything else.
    """
    hosts: list[str] = []
    for entry in _split_top_level(text.strip()):
        hosts.extend(_expand_host_entry(entry))
    if not hosts:
        raise ValueError(f"empty host list {text!r}")
    return hosts


def _split_top_level(text: str) -> list[str]:
    entries, depth, current = [], 0, ""
    for char in text:
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in host list {text!r}")
        if char == "," and depth == 0:
            entries.append(current)
            current = ""
        else:
            current += char
    if depth != 0:
        raise ValueError(f"unbalanced '[' in host list {text!r}")
    entries.append(current)
    return [entry.strip() for entry in entries if entry.strip()]


def _expand_host_entry(entry: str) -> list[str]:
    match = re.match(r"^([^\[\]]*)\[([^\[\]]+)\](.*)$", entry)
    if match is None:
        if "[" in entry or "]" in entry or not entry:
            raise ValueError(f"cannot parse host list entry {entry!r}")
        return [entry]
    prefix, ranges, rest = match.groups()
    numbers = []
    for part in ranges.split(","):
        bounds = part.strip().split("-")
        if len(bounds) == 1 and bounds[0].isdigit():
            numbers.append(bounds[0])
        elif len(bounds) == 2 and all(b.isdigit() for b in bounds) and int(bounds[0]) <= int(bounds[1]):
            width = len(bounds[0])
            numbers.extend(str(n).zfill(width) for n in range(int(bounds[0]), int(bounds[1]) + 1))
        else:
            raise ValueError(f"cannot parse range {part!r} in host list entry {entry!r}")
    tails = _expand_host_entry(rest) if rest else [""]
    return [f"{prefix}{number}{tail}" for number in numbers for tail in tails]


def _count_ids(text: str) -> list[str]:
    """``"0,1"``, ``"0-3"`` or ``"0-1,4"`` -> the listed ids (SLURM's GPU id lists)."""
    ids: list[str] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        low, _, high = part.partition("-")
        if high and low.isdigit() and high.isdigit():
            ids.extend(str(n) for n in range(int(low), int(high) + 1))
        else:
            ids.append(part)
    return ids


def visible_gpus(environ: Mapping[str, str]) -> tuple[list[str] | None, str]:
    """The GPU labels the environment gives this node, and where they come from.

    ``CUDA_VISIBLE_DEVICES`` first (the labels the launcher's ``--gpus`` refers to; SLURM sets it
    for a job with GPUs), then SLURM's ``SLURM_STEP_GPUS`` / ``SLURM_JOB_GPUS`` (physical ids, which
    are the labels when nothing restricts visibility) and ``SLURM_GPUS_ON_NODE`` (a count). ``None``
    when the environment says nothing about GPUs.
    """
    cvd = environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        cvd = cvd.strip()
        # "NoDevFiles" is what SLURM writes when a job has no GPU; "-1" hides every device.
        if cvd in ("", "-1", "NoDevFiles"):
            return [], "CUDA_VISIBLE_DEVICES"
        if cvd != "all":
            return [label.strip() for label in cvd.split(",") if label.strip()], "CUDA_VISIBLE_DEVICES"
    for name in ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):
        if environ.get(name, "").strip():
            return _count_ids(environ[name]), name
    on_node = _int_or_none(environ.get("SLURM_GPUS_ON_NODE"))
    if on_node is not None:
        return [str(i) for i in range(on_node)], "SLURM_GPUS_ON_NODE"
    return None, ""


def parse_scontrol_job(text: str) -> dict[str, str]:
    """``SLURM_JOB_NUM_NODES`` and ``SLURM_JOB_NODELIST`` from ``scontrol show job -o <id>`` output."""
    found = {}
    nodes = re.search(r"(?:^|\s)NumNodes=(\d+)", text)
    nodelist = re.search(r"(?:^|\s)NodeList=(\S+)", text)
    if nodes:
        found["SLURM_JOB_NUM_NODES"] = nodes.group(1)
    if nodelist and nodelist.group(1) != "(null)":
        found["SLURM_JOB_NODELIST"] = nodelist.group(1)
    return found


def complete_slurm_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` with the job's nodes filled in from ``scontrol`` when SLURM's variables are missing.

    snakemake-executor-plugin-slurm's job step removes every ``SLURM_*`` variable but the job id
    (and a few others) before it runs a job's command, so the command cannot see how many nodes its
    job has; the controller can tell. Without ``scontrol`` the environment is returned unchanged.
    """
    env = dict(environ)
    job_id = env.get("SLURM_JOB_ID")
    if not job_id or (env.get("SLURM_JOB_NODELIST") and (env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES"))):
        return env
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return env
    try:
        out = subprocess.run([scontrol, "show", "job", "-o", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(f"SLURM job {job_id}: scontrol failed ({exc}); assuming one node", file=sys.stderr)
        return env
    if out.returncode != 0:
        print(f"SLURM job {job_id}: scontrol failed ({out.stderr.strip()}); assuming one node", file=sys.stderr)
        return env
    for key, value in parse_scontrol_job(out.stdout).items():
        env.setdefault(key, value)
    return env


def _slurm_nnodes(environ: Mapping[str, str]) -> int:
    for name in ("SLURM_JOB_NUM_NODES", "SLURM_NNODES"):
        value = _int_or_none(environ.get(name))
        if value is not None:
            return value
    return 1


def resolve_launch_plan(
    environ: Mapping[str, str],
    gpus: int,
    cpu_ranks: int,
    *,
    nnodes: int | None = None,
    node_rank: int | None = None,
    master: str | None = None,
    master_port: int | None = None,
) -> LaunchPlan:
    """The ranks of a fine-tuning job from its configuration and its environment (``os.environ``).

    Ranks on a node: with ``gpus > 0`` one per GPU, the first ``gpus`` of those the environment
    shows (:func:`visible_gpus`); fewer than ``gpus`` is a :class:`ConfigError`, and with no GPU
    information at all the labels ``0..gpus-1`` are assumed. With ``gpus == 0``, ``cpu_ranks`` CPU
    ranks.

    Nodes: explicit ``nnodes`` / ``node_rank`` / ``master`` (``host:port``) describe a run started
    by hand on every node. Otherwise a SLURM allocation of several nodes (``SLURM_JOB_NUM_NODES`` or
    ``SLURM_NNODES`` > 1) makes a SLURM plan: the nodes of ``SLURM_JOB_NODELIST``, the first one as
    master, on ``master_port`` or a port derived from the job id.
    """
    if gpus < 0 or cpu_ranks < 1:
        raise ConfigError(f"finetune needs gpus >= 0 and cpu_ranks >= 1, got gpus={gpus}, cpu_ranks={cpu_ranks}")
    devices: tuple[str, ...] = ()
    if gpus > 0:
        labels, source = visible_gpus(environ)
        if labels is None:
            labels = [str(i) for i in range(gpus)]
        elif len(labels) < gpus:
            raise ConfigError(
                f"finetune.gpus is {gpus}, but this node has {len(labels)} GPU(s) "
                f"({source}={environ.get(source, '')!r}); request {gpus} GPUs per node from the "
                "scheduler or lower finetune.gpus"
            )
        devices = tuple(labels[:gpus])
    per_node = gpus if gpus > 0 else cpu_ranks

    if nnodes is not None or master is not None or node_rank is not None:
        nnodes = 1 if nnodes is None else nnodes
        if nnodes < 1:
            raise ConfigError(f"nnodes must be >= 1, got {nnodes}")
        if nnodes == 1:
            if node_rank not in (None, 0):
                raise ConfigError(f"node rank {node_rank} given for a single-node run")
            return LaunchPlan(per_node, gpus > 0, devices)
        if master is None or node_rank is None:
            raise ConfigError("a run on several nodes started by hand needs --master HOST:PORT and --node-rank on every node")
        if not 0 <= node_rank < nnodes:
            raise ConfigError(f"node rank must be in 0..{nnodes - 1}, got {node_rank}")
        _split_endpoint(master)
        return LaunchPlan(per_node, gpus > 0, devices, nnodes=nnodes, node_rank=node_rank, master=master)

    job_nodes = _slurm_nnodes(environ) if environ.get("SLURM_JOB_ID") else 1
    if job_nodes <= 1:
        return LaunchPlan(per_node, gpus > 0, devices)
    step_nodes = _int_or_none(environ.get("SLURM_STEP_NUM_NODES"))
    if environ.get("SLURM_STEP_ID") is not None and step_nodes is not None and step_nodes < job_nodes:
        raise ConfigError(
            f"the SLURM job has {job_nodes} nodes but this command runs in a job step on {step_nodes}; "
            "run it in the batch script (with snakemake-executor-plugin-slurm: give the rule the "
            "resource mpi, see profiles/slurm/config.yaml) so it can start a launcher on every node"
        )
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if not nodelist:
        raise ConfigError("SLURM_JOB_NODELIST is not set in a SLURM job of several nodes")
    try:
        hosts = tuple(expand_hostlist(nodelist))
    except ValueError as exc:
        raise ConfigError(f"SLURM_JOB_NODELIST: {exc}") from None
    if len(hosts) != job_nodes:
        raise ConfigError(f"SLURM_JOB_NODELIST {nodelist!r} names {len(hosts)} hosts, the job has {job_nodes} nodes")
    job_id = environ["SLURM_JOB_ID"]
    port = master_port or SLURM_MASTER_PORT_BASE + (_int_or_none(job_id.split("_")[0]) or 0) % 20000
    return LaunchPlan(per_node, gpus > 0, devices, nnodes=job_nodes, node_rank=0, master=f"{hosts[0]}:{port}",
                      hosts=hosts, slurm=True, job_id=f"vlretrieval-{job_id}")


def _split_endpoint(endpoint: str) -> tuple[str, int]:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"master must be HOST:PORT, got {endpoint!r}")
    return host, int(port)


def master_endpoint(master: str) -> str:
    """``host:port`` with the host as the IPv4 address ``paddle.distributed.launch`` needs.

    The launcher serves the rendezvous only on the node whose own address (its host name's fully
    qualified name, resolved) equals the master's, or when the master is 127.0.0.1; a host name
    would leave every node waiting. This machine's name is resolved the way the launcher resolves it.
    """
    import socket

    host, port = _split_endpoint(master)
    local = socket.gethostname()
    try:
        if host in (local, local.split(".")[0], socket.getfqdn(local)):
            address = socket.gethostbyname(socket.getfqdn(local))
        else:
            address = socket.gethostbyname(host)
    except OSError as exc:
        raise ConfigError(f"cannot resolve the master host {host!r}: {exc}") from None
    return f"{address}:{port}"


def slurm_launch_command(plan: LaunchPlan, log_dir: str | os.PathLike, args: Sequence[str], *, master: str,
                         python: str | None = None, max_restart: int = 0, environ: Mapping[str, str] | None = None) -> list[str]:
    """``srun`` that starts one launcher on every node of the SLURM job, node rank ``SLURM_NODEID``.

    Run from the batch script (on the first node). ``--kill-on-bad-exit`` ends every node when one
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
    if environ.get("SLURM_CPUS_PER_TASK"):
        cmd.append(f"--cpus-per-task={environ['SLURM_CPUS_PER_TASK']}")
    return cmd + ["sh", "-c", script]


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


RUN_IDENTITY_FILE = "run_identity.json"
# How often a run logs and saves, and how it loads data, do not change its numbers, so a rerun that
# changes only these resumes. The schedule length does change them (the cosine decay spans the whole
# run), so it belongs to the identity like every other setting.
RESUMABLE_CHANGES = frozenset({"logging_steps", "save_steps", "save_total_limit", "dataloader_num_workers"})


def run_identity(model_dir: str | os.PathLike, train_data: str | os.PathLike, hparams: Mapping[str, Any],
                 n_ranks: int, regions: str | os.PathLike | None = None) -> dict[str, Any]:
    """What a run's checkpoints depend on: starting weights, training data, recipe and world size.

    Keys in :data:`RESUMABLE_CHANGES` are left out: changing them resumes the same run.
    """
    from ..io import sha256_file

    from ..data.regions import REGIONS_DIR

    model_dir, train_data = Path(model_dir), Path(train_data)
    identity = {
        "weights": {p.name: sha256_file(p) for p in sorted(model_dir.glob("*.pdparams"))},
        "train_texts": sha256_file(train_data / "texts.jsonl"),
        "train_images": sha256_file(train_data / "imgs" / "data.mdb"),
        "hparams": {key: value for key, value in sorted(hparams.items()) if key not in RESUMABLE_CHANGES},
        "ranks": int(n_ranks),
    }
    if regions is not None:
        identity["train_regions"] = sha256_file(Path(regions) / REGIONS_DIR / "data.mdb")
    return identity


def claim_work_dir(work_dir: str | os.PathLike, identity: Mapping[str, Any]) -> bool:
    """Make ``work_dir`` belong to the run ``identity``; returns True when checkpoints were discarded.

    Checkpoints left by a run with other weights, data, hyperparameters or world size must not be
    resumed: the result would silently mix two recipes. They are removed, with a message.
    """
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    path = work_dir / RUN_IDENTITY_FILE
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        previous = None
    discarded = False
    if previous != json.loads(json.dumps(identity)):
        stale = [p for _, p in list_checkpoints(work_dir)]
        if stale or (work_dir / TRAIN_LOG).exists():
            print(f"{work_dir}: checkpoints belong to a different run (weights, data, hyperparameters or "
                  f"ranks changed); removing {len(stale)} checkpoint(s) and starting over", file=sys.stderr)
            discarded = True
        for checkpoint in stale:
            shutil.rmtree(checkpoint)
        (work_dir / TRAIN_LOG).unlink(missing_ok=True)
        with atomic_open(path) as handle:
            json.dump(identity, handle, indent=2, sort_keys=True)
    return discarded


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
    """Run :func:`finetune` through ``paddle.distributed.launch`` and wait.

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


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(text) if text else None
    except ValueError:
        return None


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


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
    from .losses import distributed_world, exit_after_peers

    rank, world_size = distributed_world()
    if rank == 0:
        print(json.dumps({"finetune": result.__dict__}), flush=True)
    if world_size > 1:
        exit_after_peers()
    return 0


if __name__ == "__main__":
    sys.exit(main())
