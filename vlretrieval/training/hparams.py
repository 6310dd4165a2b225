"""Fine-tuning hyperparameters: the defaults (the reference recipe), their validation, and the
paddlenlp ``TrainingArguments`` a run builds from them."""

from __future__ import annotations

import os
from typing import Any, Mapping

from ..config import MODELS_SCHEMA, fill_schema_defaults, validate_against_schema
from ..errors import ConfigError


#: The ERNIE-ViL 2.0 Flickr30k-CN recipe (PaddleNLP ``model_zoo/ernie-vil2.0``), overridable per run:
#: the defaults of the ``train`` block of config/schemas/models.schema.yaml, which names, documents
#: and bounds every hyperparameter.
DEFAULT_HPARAMS: dict[str, Any] = fill_schema_defaults({}, MODELS_SCHEMA, "train")


def resolve_hparams(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """:data:`DEFAULT_HPARAMS` updated with ``overrides``; unknown keys and bad values raise ConfigError.

    The model schema's ``train`` block checks names, types and ranges (the workflow has already
    applied it to every model entry and pair override); the checks below are those a schema cannot
    express.
    """
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(DEFAULT_HPARAMS))
    if unknown:
        raise ConfigError(f"unknown fine-tuning hyperparameter(s) {unknown}; known: {sorted(DEFAULT_HPARAMS)}")
    checked = validate_against_schema(overrides, MODELS_SCHEMA, "fine-tuning hyperparameter", keys=("train",))
    hparams = {key: checked[key] for key in DEFAULT_HPARAMS}
    crop = hparams["crop_scale"]
    if crop is not None and not crop[0] <= crop[1]:
        raise ConfigError(f"hyperparameter crop_scale must be null or [low, high] with 0 < low <= high <= 1, got {crop!r}")
    from ..models.randaugment import randaugment_from

    randaugment_from(hparams["randaugment"])
    hparams["lr_multipliers"] = {group: float(rate) for group, rate in sorted(hparams["lr_multipliers"].items())}
    return hparams


def check_amp_device(amp: Mapping[str, Any] | None, device: str) -> None:
    """Raise ConfigError, naming ``train.amp.dtype``, when ``device`` ("cpu" or "gpu") cannot run ``amp``.

    On the CPU paddle (3.3) turns ``auto_cast`` off with only a warning and has no bfloat16 or
    float16 CPU kernels for matmul, layer_norm, softmax or conv2d, so a half-precision run there
    would silently train in float32. On a GPU the device must support the dtype (bfloat16 needs
    compute capability 8.0). Call it before loading data or building a model.
    """
    if not amp:
        return
    dtype = amp["dtype"]
    if device != "gpu":
        raise ConfigError(
            f"train.amp.dtype {dtype!r} cannot run on device {device!r}: paddle's mixed precision "
            "(auto_cast) runs on GPUs only and would silently train in float32 here; set train.amp to "
            "null for CPU ranks or fine-tune on GPUs (finetune.gpus)"
        )
    import paddle

    supported = paddle.amp.is_float16_supported() if dtype == "float16" else paddle.amp.is_bfloat16_supported()
    if not supported:
        hint = "bfloat16 needs compute capability 8.0; use float16, or" if dtype == "bfloat16" else "set train.amp to"
        raise ConfigError(
            f"train.amp.dtype {dtype!r} is not supported by this job's GPU "
            f"({paddle.device.cuda.get_device_name()}); {hint} null for float32"
        )


def resolve_dataloader_workers(configured: int | None, *, device: str, cpus: int, local_ranks: int) -> int:
    """Image-decoding worker processes of one rank: ``configured`` when set, else on GPU ranks the
    ``cpus`` of this node shared by its ``local_ranks`` ranks, less the rank's own process, at
    least 1, and 0 on CPU ranks (there every core already runs a rank's arithmetic)."""
    if configured is not None:
        return int(configured)
    if device != "gpu":
        return 0
    return max(1, cpus // max(1, local_ranks) - 1)


def amp_training_arguments(amp: Mapping[str, Any] | None) -> dict[str, Any]:
    """The paddlenlp ``TrainingArguments`` fields of a ``train.amp`` setting (float32 for null).

    The Trainer then autocasts forward and loss at ``fp16_opt_level``, decorates the model to half
    precision at O2, and for float16 scales the loss with ``paddle.amp.GradScaler(init_loss_scaling=
    scale_loss)``.
    """
    if not amp:
        return {"fp16": False, "bf16": False}
    return {
        "fp16": amp["dtype"] == "float16",
        "bf16": amp["dtype"] == "bfloat16",
        "fp16_opt_level": amp["level"],
        "scale_loss": float(amp["init_loss_scaling"]),
    }


def training_arguments(
    hparams: Mapping[str, Any], output_dir: str | os.PathLike, *, device: str, recompute: bool,
    dataloader_num_workers: int, disable_tqdm: bool = True
):
    """paddlenlp ``TrainingArguments`` of a fine-tuning run from resolved hyperparameters, with the
    rank's data-loading workers (:func:`resolve_dataloader_workers`)."""
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
        dataloader_num_workers=dataloader_num_workers,
        # Cross-batch negatives need the same local batch size on every rank.
        dataloader_drop_last=True,
        remove_unused_columns=False,
        report_to=["none"],
        disable_tqdm=disable_tqdm,
        **amp_training_arguments(hparams["amp"]),
    )
