"""Conversion of torch Oscar / VinVL checkpoints into saved model directories of the family.

``python -m vlretrieval.models.vinvl convert --checkpoint DIR --out DIR`` runs :func:`main`.

``use_img_layernorm``: Oscar applies the image LayerNorm only when the checkpoint's config sets it
to a true value; ``run_retrieval.py`` has no flag for it, so a retrieval checkpoint inherits whatever
its pretraining config says. The converter reads it from ``config.json``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import paddle
from paddlenlp.transformers import BertTokenizer

from ...errors import ConfigError
from ..base import read_model_info, seeded_build
from .configuration import OscarConfig
from .family import FAMILY
from .modeling import OscarForImageTextMatching

logger = logging.getLogger(__name__)

# Heads of Oscar(+) pretraining (masked LM, contrastive/NSP) that a matching model has no use for.
IGNORED_PREFIXES = ("cls.", "bert.cls.", "seq_relationship.", "bert.seq_relationship.")
# Buffers newer transformers versions write into state dicts; they are not weights.
IGNORED_SUFFIXES = ("position_ids",)
CLASSIFIER_KEYS = ("classifier.weight", "classifier.bias")
# Oscar BertConfig fields -> OscarConfig arguments (same names); anything else is ignored.
CONFIG_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
    "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings", "type_vocab_size",
    "initializer_range", "layer_norm_eps", "img_feature_dim", "img_layer_norm_eps", "num_labels",
)
# pytorch-transformers 1.x wrote LayerNorm parameters as gamma/beta, later versions as weight/bias.
_NORM_ALIASES = {"weight": ("weight", "gamma"), "bias": ("bias", "beta")}
_LAYER_PARTS = {
    "self_attn.q_proj": ("attention.self.query", "linear"),
    "self_attn.k_proj": ("attention.self.key", "linear"),
    "self_attn.v_proj": ("attention.self.value", "linear"),
    "self_attn.out_proj": ("attention.output.dense", "linear"),
    "norm1": ("attention.output.LayerNorm", "norm"),
    "linear1": ("intermediate.dense", "linear"),
    "linear2": ("output.dense", "linear"),
    "norm2": ("output.LayerNorm", "norm"),
}
_TOP_PARTS = {
    "embeddings.word_embeddings": ("bert.embeddings.word_embeddings", "embedding"),
    "embeddings.position_embeddings": ("bert.embeddings.position_embeddings", "embedding"),
    "embeddings.token_type_embeddings": ("bert.embeddings.token_type_embeddings", "embedding"),
    "embeddings.layer_norm": ("bert.embeddings.LayerNorm", "norm"),
    "pooler.dense": ("bert.pooler.dense", "linear"),
    "img_embedding": ("bert.img_embedding", "linear"),
    # BertImgModel names its image LayerNorm plain ``LayerNorm``.
    "img_layer_norm": ("bert.LayerNorm", "norm"),
    "classifier": ("classifier", "linear"),
}


@dataclass
class ConversionReport:
    """What a checkpoint conversion did besides copying weights one to one."""

    ignored_keys: list[str] = field(default_factory=list)
    classifier_initialised: bool = False

    def as_info(self) -> dict[str, Any]:
        return {"ignored_keys": list(self.ignored_keys), "classifier_initialised": self.classifier_initialised}

    def lines(self) -> list[str]:
        out = []
        if self.ignored_keys:
            out.append(f"ignored {len(self.ignored_keys)} pretraining-head keys: {', '.join(self.ignored_keys)}")
        if self.classifier_initialised:
            out.append(
                "the checkpoint has no classifier.* (not fine-tuned for retrieval): the matching head "
                "is freshly initialised and must be trained before its scores mean anything"
            )
        return out


def torch_name_map(config: OscarConfig) -> dict[str, tuple[tuple[str, ...], str]]:
    """Paddle parameter name -> (accepted torch names, kind) for a model with ``config``.

    ``kind`` is ``linear`` (weight transposed: torch stores ``[out, in]``, paddle ``[in, out]``),
    ``norm`` or ``embedding`` (copied as is).
    """
    parts: dict[str, tuple[str, str]] = {}
    for paddle_part, (torch_part, kind) in _TOP_PARTS.items():
        if paddle_part == "img_layer_norm" and not config.use_img_layernorm:
            continue
        parts[paddle_part] = (torch_part, kind)
    for i in range(config.num_hidden_layers):
        for paddle_part, (torch_part, kind) in _LAYER_PARTS.items():
            parts[f"encoder.layers.{i}.{paddle_part}"] = (f"bert.encoder.layer.{i}.{torch_part}", kind)
    names: dict[str, tuple[tuple[str, ...], str]] = {}
    for paddle_part, (torch_part, kind) in parts.items():
        suffixes = ("weight",) if kind == "embedding" else ("weight", "bias")
        for suffix in suffixes:
            aliases = _NORM_ALIASES[suffix] if kind == "norm" else (suffix,)
            names[f"{paddle_part}.{suffix}"] = (tuple(f"{torch_part}.{alias}" for alias in aliases), kind)
    return names


def oscar_config_from_json(raw: dict[str, Any], where: str | os.PathLike = "config.json") -> OscarConfig:
    """An :class:`OscarConfig` from an Oscar ``BertConfig`` dictionary; refuses what this model cannot run."""
    feature_type = raw.get("img_feature_type")
    if feature_type is not None and str(feature_type).startswith("dis_code"):
        raise ConfigError(f"{where}: img_feature_type {feature_type!r} (discrete codes) is not supported; only region features")
    classifier = raw.get("classifier", "linear")
    if classifier != "linear":
        raise ConfigError(f"{where}: classifier {classifier!r} is not supported; only Oscar's linear classifier")
    num_labels = int(raw.get("num_labels", 2))
    if num_labels != 2:
        raise ConfigError(f"{where}: num_labels is {num_labels}; only binary image-text matching (2) is supported")
    if raw.get("hidden_act", "gelu") not in ("gelu", "relu"):
        raise ConfigError(f"{where}: hidden_act {raw.get('hidden_act')!r} is not supported (gelu or relu)")
    if "img_feature_dim" not in raw:
        raise ConfigError(f"{where}: no img_feature_dim; not an Oscar image-text checkpoint")
    kwargs = {name: raw[name] for name in CONFIG_FIELDS if name in raw}
    # Oscar skips the image LayerNorm when the field is absent or false (it is stored as 0/1).
    kwargs["use_img_layernorm"] = bool(raw.get("use_img_layernorm") or False)
    kwargs["pad_token_id"] = int(raw.get("pad_token_id", 0) or 0)
    return OscarConfig(**kwargs)


def convert_oscar_state(
    state: dict[str, Any], config: OscarConfig, *, seed: int = 0
) -> tuple[OscarForImageTextMatching, ConversionReport]:
    """A paddle model holding the weights of an Oscar torch ``state`` (name -> array-like)."""
    model = seeded_build(seed, lambda: OscarForImageTextMatching(config))
    wanted = model.state_dict()
    names = torch_name_map(config)
    unmapped = sorted(set(wanted) - set(names))
    if unmapped:  # pragma: no cover - a model change without a matching name map
        raise ConfigError(f"no torch name known for paddle parameters {unmapped}")

    report = ConversionReport()
    used: set[str] = set()
    values: dict[str, np.ndarray] = {}
    missing: list[str] = []
    for paddle_name, (candidates, kind) in names.items():
        found = [name for name in candidates if name in state]
        if len(found) > 1:
            raise ConfigError(f"checkpoint holds both {found[0]} and {found[1]} for {paddle_name}")
        if not found:
            missing.append(paddle_name)
            continue
        torch_name = found[0]
        used.add(torch_name)
        array = _to_numpy(state[torch_name])
        transposed = kind == "linear" and paddle_name.endswith(".weight")
        expected = list(wanted[paddle_name].shape)
        expected_torch = expected[::-1] if transposed else expected
        if list(array.shape) != expected_torch:
            raise ConfigError(
                f"checkpoint key {torch_name} has shape {list(array.shape)}, but this config needs "
                f"{expected_torch} (for {paddle_name})"
            )
        if transposed:
            array = array.T
        values[paddle_name] = np.ascontiguousarray(array)

    missing_classifier = [name for name in missing if name in CLASSIFIER_KEYS]
    if len(missing_classifier) == len(CLASSIFIER_KEYS):
        report.classifier_initialised = True
        missing = [name for name in missing if name not in CLASSIFIER_KEYS]
    if missing:
        described = [f"{names[name][0][0]} (for {name})" for name in missing]
        raise ConfigError(f"checkpoint lacks {len(missing)} keys: {', '.join(described)}")

    unknown = []
    for name in sorted(set(state) - used):
        if name.startswith(IGNORED_PREFIXES) or name.endswith(IGNORED_SUFFIXES):
            report.ignored_keys.append(name)
        else:
            unknown.append(f"{name} {list(np.shape(_to_numpy(state[name])))}")
    if unknown:
        raise ConfigError(f"checkpoint has keys this model does not know: {', '.join(unknown)}")

    for paddle_name, array in values.items():
        wanted[paddle_name].set_value(paddle.to_tensor(array.astype(np.float32)).astype(wanted[paddle_name].dtype))
    model.eval()
    return model, report


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; bf16/fp16 go through float32
        return value.detach().cpu().float().numpy()
    return np.asarray(value, dtype=np.float32)


def _import_torch():
    try:
        import torch
    except ImportError as exc:
        raise ConfigError(
            "converting an Oscar/VinVL checkpoint needs PyTorch to read pytorch_model.bin; install torch (CPU "
            "is enough) in the environment that runs the conversion"
        ) from exc
    return torch


def convert_oscar_checkpoint(
    checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike, *, do_lower_case: bool = True
) -> Path:
    """Convert a torch Oscar/VinVL directory (``pytorch_model.bin``, ``config.json``, ``vocab.txt``)
    into a saved model directory of this family, written atomically; returns ``out_dir``.

    The model info records the ignored pretraining-head keys and whether the matching head was
    freshly initialised (an Oscar+ pretrained checkpoint has no ``classifier``).
    """
    checkpoint_dir = Path(checkpoint_dir).expanduser()
    files = {name: checkpoint_dir / name for name in ("pytorch_model.bin", "config.json", "vocab.txt")}
    absent = [name for name, path in files.items() if not path.is_file()]
    if absent:
        raise ConfigError(f"{checkpoint_dir}: not an Oscar checkpoint directory (missing {', '.join(absent)})")
    with open(files["config.json"], "r", encoding="utf-8") as handle:
        raw = json.load(handle)
    config = oscar_config_from_json(raw, files["config.json"])
    torch = _import_torch()
    try:
        state = torch.load(files["pytorch_model.bin"], map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"{files['pytorch_model.bin']}: cannot read the torch state dict: {exc}") from exc
    if not isinstance(state, dict):
        raise ConfigError(f"{files['pytorch_model.bin']}: expected a state dict, got {type(state).__name__}")
    try:
        model, report = convert_oscar_state(state, config)
    except ConfigError as exc:
        raise ConfigError(f"{checkpoint_dir}: {exc}") from None
    tokenizer = BertTokenizer(vocab_file=str(files["vocab.txt"]), do_lower_case=do_lower_case)
    if tokenizer.vocab_size > config.vocab_size:
        # A smaller vocab.txt only leaves rows unused; a larger one would index past the table.
        raise ConfigError(
            f"{checkpoint_dir}: vocab.txt has {tokenizer.vocab_size} tokens but the embedding table only "
            f"{config.vocab_size} rows"
        )
    for line in report.lines():
        logger.warning("%s: %s", checkpoint_dir, line)
    FAMILY.save_atomic(
        model, tokenizer, out_dir, extra_info={"converted_from": str(checkpoint_dir), **report.as_info()}
    )
    return Path(out_dir)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vlretrieval.models.vinvl convert --checkpoint DIR --out DIR``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m vlretrieval.models.vinvl", description=main.__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="convert a torch Oscar/VinVL checkpoint directory")
    convert.add_argument("--checkpoint", type=Path, required=True, help="directory with pytorch_model.bin, config.json, vocab.txt")
    convert.add_argument("--out", type=Path, required=True, help="model directory to write")
    convert.add_argument("--cased", action="store_true", help="keep case when tokenizing (Oscar models are uncased)")
    args = parser.parse_args(argv)
    out = convert_oscar_checkpoint(args.checkpoint, args.out, do_lower_case=not args.cased)
    info = read_model_info(out)
    print(f"{args.checkpoint} converted to {out}")
    for line in ConversionReport(info.get("ignored_keys", []), bool(info.get("classifier_initialised"))).lines():
        print(line)
    return 0
