"""The PaddleNLP Trainer of fine-tuning and its callbacks: the model's own loss (and its parts),
an optimizer over the trainable parameters only, freezing, learning-rate multipliers per parameter
group, data order and random state that survive a resume (:mod:`vlretrieval.training.random_state`),
the metrics log, the temperature clamp and the checkpoint marker."""

from __future__ import annotations

import functools
import json
import operator
import shutil
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import ConfigError
from .checkpoints import truncate_train_log, write_checkpoint_marker
from .random_state import (
    epoch_batch_sampler,
    rank_random_state_file,
    restore_rank_random_state,
    save_rank_random_state,
)


#: Keys of the Trainer's logs that carry a family's loss parts (``training_loss_parts``).
LOSS_PART_PREFIX = "loss_part_"


def _trainer_class():
    import paddle
    from paddlenlp.trainer import Trainer

    class RetrievalTrainer(Trainer):
        """Trainer whose loss is the model's own ``training_loss`` of its ``forward`` output.

        Dual encoders return local features (:class:`~vlretrieval.models.modeling_utils.DualEncoderOutput`) and
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

        def _get_train_sampler(self):
            # Also with one rank, where paddlenlp's own sampler shuffles from numpy's global state.
            return epoch_batch_sampler(
                self.train_dataset,
                batch_size=self.args.per_device_train_batch_size,
                num_replicas=self.args.dataset_world_size,
                rank=self.args.dataset_rank,
                seed=self.args.seed,
                accumulation_steps=self.args.gradient_accumulation_steps,
            )

        def _load_rng_state(self, checkpoint):
            # paddlenlp restores only once it has skipped a partial epoch, so never on a resume at
            # an epoch boundary; the callback restores each rank's own file when training starts.
            # Checkpoints written without those files keep paddlenlp's restore.
            if checkpoint is None or rank_random_state_file(checkpoint, self.args.process_index).is_file():
                return
            super()._load_rng_state(checkpoint)

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
                if hasattr(optimizer_cls, "_create_master_weight") and self.args.fp16_opt_level == "O2" \
                        and (self.args.fp16 or self.args.bf16):
                    # As paddlenlp's own create_optimizer: O2 weights are half precision, so the
                    # optimizer updates float32 master copies of them.
                    optimizer_kwargs["multi_precision"] = True
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


def _trainer_callback_base():
    from paddlenlp.trainer import TrainerCallback

    return TrainerCallback


def _is_world_zero(state) -> bool:
    return bool(getattr(state, "is_world_process_zero", True))


def make_callbacks(train_log: Path, *, model_dir: Path, resumed_from: Path | None, run_info: dict[str, Any]):
    """The callbacks of a fine-tuning run: metrics log, temperature clamp, per-rank random state,
    checkpoint marker."""
    import paddle
    import paddle.distributed as dist

    from ..models.base import MODEL_INFO_FILE
    from ..models.losses import distributed_world

    base = _trainer_callback_base()
    # Copied into every checkpoint so that one can be evaluated like a saved model directory.
    model_dir_extras = [model_dir / name for name in (MODEL_INFO_FILE, "preprocessor_config.json")]

    class JsonlMetricsCallback(base):
        """Appends the records described in :mod:`vlretrieval.training.checkpoints` to ``train_log.jsonl`` (rank 0)."""

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

    class RankRandomStateCallback(base):
        """Saves every rank's random generators into each checkpoint and restores them on resume."""

        def on_train_begin(self, args, state, control, **kwargs):
            # Nothing between here and the first resumed step draws from these generators: the
            # skipped batches and all augmentation draw from per-item streams.
            if resumed_from is not None:
                restore_rank_random_state(resumed_from, distributed_world()[0])

        def on_save(self, args, state, control, **kwargs):
            # Before CheckpointMarkerCallback, whose barrier then covers these files too.
            save_rank_random_state(Path(args.output_dir) / f"checkpoint-{state.global_step}", distributed_world()[0])

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

    return [JsonlMetricsCallback(), LogitScaleClampCallback(), RankRandomStateCallback(), CheckpointMarkerCallback()]
