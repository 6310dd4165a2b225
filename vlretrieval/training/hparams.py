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
