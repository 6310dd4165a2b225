"""Pretraining an initial model on its pair's training split, before fine-tuning.

A cross encoder that starts from random weights (``init: tiny``) and is fine-tuned on binary
image-text matching alone has one easy signal, the number of objects, and almost no gradient
towards comparing caption words with the image: on the English demo its loss stalls at chance on
negatives with the same number of regions. Oscar and VinVL never fine-tune from scratch; they first
pretrain with a masked-token loss over ``caption + tags`` given the regions, which makes every
masked word a dense lesson in reading the other modality. ``pretrain`` in a model entry runs that
objective here, on the training split only, and then drops the prediction head: the saved model
keeps its untrained matching head, so the zero-shot stage still measures an untrained matcher.

Masking follows BERT/Oscar: every caption or tag token (never ``[CLS]``, ``[SEP]`` or padding) is
chosen with ``mask_probability``; a chosen token becomes ``[MASK]`` 80 % of the time, a random token
10 % and stays itself 10 %, and the loss is the cross-entropy of the chosen tokens only.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Mapping

import numpy as np

from ...errors import ConfigError
from ..base import checked_context_length
from ..registry import get_family
from .data import RegionPairDataset
from .modeling import OscarMaskedTokenHead

_log = logging.getLogger(__name__)

#: Defaults of a model entry's ``pretrain`` mapping (``steps`` has none: it must be given).
PRETRAIN_DEFAULTS: dict[str, Any] = {
    "steps": None,
    "learning_rate": 5e-4,
    "warmup_steps": 50,
    "batch_size": 64,
    "weight_decay": 0.01,
    "mask_probability": 0.15,
    "max_len": None,  # None: the family's training length
    "seed": 0,
}
IGNORE_INDEX = -100
LOG_EVERY = 50


def resolve_pretrain_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """:data:`PRETRAIN_DEFAULTS` updated with ``settings``; unknown keys and bad values raise ConfigError."""
    unknown = sorted(set(settings) - set(PRETRAIN_DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown pretrain setting(s) {unknown}; known: {sorted(PRETRAIN_DEFAULTS)}")
    resolved = {**PRETRAIN_DEFAULTS, **settings}

    def integer(key: str, minimum: int) -> None:
        value = resolved[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"pretrain {key} must be an integer >= {minimum}, got {value!r}")

    integer("steps", 1)
    integer("batch_size", 1)
    integer("warmup_steps", 0)
    integer("seed", 0)
    if resolved["max_len"] is not None:
        integer("max_len", 3)
    for key, low, high in (("learning_rate", 0.0, math.inf), ("mask_probability", 0.0, 1.0)):
        value = resolved[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value <= high:
            raise ConfigError(f"pretrain {key} must be a number in ({low}, {high}], got {value!r}")
    decay = resolved["weight_decay"]
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or decay < 0:
        raise ConfigError(f"pretrain weight_decay must be a non-negative number, got {decay!r}")
    return resolved


def mask_tokens(input_ids: np.ndarray, maskable: np.ndarray, *, mask_id: int, vocab_size: int,
                probability: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """BERT's masking of ``input_ids [n, L]`` where ``maskable`` is true: (inputs, labels).

    Labels are the original ids at chosen positions and :data:`IGNORE_INDEX` elsewhere. A batch in
    which no position was drawn gets one (at random among the maskable ones), so the loss is never an
    average over nothing.
    """
    if not maskable.any():
        raise ValueError("no maskable token in the batch: every row is special tokens and padding")
    chosen = maskable & (rng.random(input_ids.shape) < probability)
    if not chosen.any():
        rows, cols = np.nonzero(maskable)
        pick = rng.integers(len(rows))
        chosen[rows[pick], cols[pick]] = True
    labels = np.where(chosen, input_ids, IGNORE_INDEX)
    inputs = input_ids.copy()
    draw = rng.random(input_ids.shape)
    inputs[chosen & (draw < 0.8)] = mask_id
    replace = chosen & (draw >= 0.8) & (draw < 0.9)
    inputs[replace] = rng.integers(0, vocab_size, size=int(replace.sum()))
    return inputs, labels


def masked_token_pretraining(family_name: str, model: Any, tokenizer: Any, train_data: str | os.PathLike,
                             regions: str | os.PathLike, settings: Mapping[str, Any]) -> dict[str, Any]:
    """Oscar's masked-token pretraining of a region cross encoder, in this process, in place.

    Each example is a gold (caption, image) pair of ``train_data``: ``[CLS] caption [SEP] tags [SEP]``
    with the image's regions. Returns what the run did, for the model's info file.
    """
    import paddle
    import paddle.nn.functional as F


    settings = resolve_pretrain_settings(settings)
    family = get_family(family_name)
    max_len = checked_context_length(settings["max_len"], family.train_max_len,
                                     model.config.max_position_embeddings, train_data)
    dataset = RegionPairDataset(train_data, regions, family_name, tokenizer)
    special = np.asarray(sorted({int(tokenizer.cls_token_id), int(tokenizer.sep_token_id),
                                 int(tokenizer.pad_token_id)}), dtype=np.int64)
    rng = np.random.default_rng(settings["seed"])
    paddle.seed(settings["seed"])
    head = OscarMaskedTokenHead(model)
    steps, warmup = settings["steps"], settings["warmup_steps"]
    schedule = paddle.optimizer.lr.LambdaDecay(
        settings["learning_rate"],
        lambda step: min(1.0, (step + 1) / max(1, warmup)) * max(0.0, (steps - step) / steps),
    )
    parameters = [p for p in model.parameters() if not p.stop_gradient]
    # The tied word embeddings belong to the model; the head brings only its own layers.
    parameters += [p for name, p in head.named_parameters() if not name.startswith("word_embeddings")]
    no_decay = {p.name for p in parameters if p.ndim == 1}
    optimizer = paddle.optimizer.AdamW(
        learning_rate=schedule, parameters=parameters, weight_decay=settings["weight_decay"],
        apply_decay_param_fun=lambda name: name not in no_decay, grad_clip=paddle.nn.ClipGradByGlobalNorm(1.0),
    )
    model.train()
    head.train()
    order: list[int] = []
    losses, accuracies = [], []
    for step in range(steps):
        if len(order) < settings["batch_size"]:
            order = rng.permutation(len(dataset)).tolist()
            while len(order) < settings["batch_size"]:  # a batch larger than the split
                order = rng.permutation(len(dataset)).tolist() + order
        examples = [dataset.positive(order.pop()) for _ in range(settings["batch_size"])]
        batch = family.assemble_pairs(
            tokenizer, [e["caption_ids"] for e in examples], [e["tag_ids"] for e in examples],
            [e["regions"] for e in examples], max_len=max_len,
        )
        maskable = (batch["attention_mask"] > 0) & ~np.isin(batch["input_ids"], special)
        batch["input_ids"], labels = mask_tokens(
            batch["input_ids"], maskable, mask_id=int(tokenizer.mask_token_id),
            vocab_size=int(model.config.vocab_size), probability=settings["mask_probability"], rng=rng,
        )
        hidden = model.encode(**{key: paddle.to_tensor(value) for key, value in batch.items()})
        logits = head(hidden[:, : labels.shape[1]]).astype("float32")
        chosen = labels != IGNORE_INDEX
        # The mean over the chosen tokens only (paddle's "mean" with ignore_index counts the others too).
        per_token = F.cross_entropy(logits, paddle.to_tensor(np.where(chosen, labels, 0)).unsqueeze(-1),
                                    reduction="none").squeeze(-1)
        weights = paddle.to_tensor(chosen.astype(np.float32))
        loss = (per_token * weights).sum() / weights.sum()
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        schedule.step()
        losses.append(float(loss))
        accuracies.append(float((logits.argmax(axis=-1).numpy() == labels)[chosen].mean()))
        if (step + 1) % LOG_EVERY == 0 or step + 1 == steps:
            _log.info("pretrain step %d/%d: masked-token loss %.4f, accuracy %.3f (mean of the last %d steps)",
                      step + 1, steps, np.mean(losses[-LOG_EVERY:]), np.mean(accuracies[-LOG_EVERY:]),
                      min(LOG_EVERY, len(losses)))
    model.eval()
    window = min(LOG_EVERY, steps)
    return {
        "objective": "masked tokens of caption and tags, given the regions (Oscar)",
        "settings": settings,
        "max_len": max_len,
        "examples": steps * settings["batch_size"],
        "loss_first": float(np.mean(losses[:window])),
        "loss_last": float(np.mean(losses[-window:])),
        "masked_accuracy_last": float(np.mean(accuracies[-window:])),
    }
