"""Conversion of Hugging Face (torch) BridgeTower checkpoints into saved model directories of the family.

``python -m vlretrieval.models.bridgetower convert --checkpoint PATH --out DIR`` runs :func:`main`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import paddle
import paddle.nn as nn
from paddlenlp.transformers import RobertaBPETokenizer

from ...errors import ConfigError
from ..base import MODEL_INFO_FILE, seeded_build
from .configuration import BridgeTowerConfig
from .family import FAMILY
from .modeling import BridgeTowerForRetrieval


class ConversionError(ConfigError):
    """A checkpoint that does not fit the BridgeTower port (unknown key, wrong shape, missing weights)."""


_VISUAL = r"bridgetower\.vision_model\.visual\."
_BLOCK = _VISUAL + r"transformer\.resblocks\.(\d+)\."
_TEXT = r"bridgetower\.text_model\."
_LAYER_PARTS = (
    # (HF sub-name inside a BERT layer, ours)
    (r"attention\.self\.(query|key|value)", r"attention.\g<p1>"),
    (r"attention\.output\.dense", "attention.out"),
    (r"attention\.output\.LayerNorm", "attention.norm"),
    (r"crossattention\.self\.(query|key|value)", r"cross_attention.\g<p1>"),
    (r"crossattention\.output\.dense", "cross_attention.out"),
    (r"crossattention\.output\.LayerNorm", "cross_attention.norm"),
    (r"intermediate\.dense", "ffn.fc_in"),
    (r"output\.dense", "ffn.fc_out"),
    (r"output\.LayerNorm", "ffn.norm"),
)


def _build_name_map() -> list[tuple[re.Pattern, str]]:
    rules: list[tuple[str, str]] = [
        (_VISUAL + r"embeddings\.class_embedding", "vision.class_embedding"),
        (_VISUAL + r"embeddings\.patch_embedding\.weight", "vision.patch_embed.weight"),
        (_VISUAL + r"embeddings\.position_embedding\.weight", "vision.pos_embed.weight"),
        (_VISUAL + r"ln_(?P<which>pre|post)\.(?P<p>weight|bias)", r"vision.ln_\g<which>.\g<p>"),
        (_BLOCK + r"attn\.in_proj_weight", r"vision.blocks.\1.qkv.weight"),
        (_BLOCK + r"attn\.in_proj_bias", r"vision.blocks.\1.qkv.bias"),
        (_BLOCK + r"attn\.out_proj\.(?P<p>weight|bias)", r"vision.blocks.\1.proj.\g<p>"),
        (_BLOCK + r"ln_(?P<i>[12])\.(?P<p>weight|bias)", r"vision.blocks.\1.ln_\g<i>.\g<p>"),
        (_BLOCK + r"mlp\.c_fc\.(?P<p>weight|bias)", r"vision.blocks.\1.fc1.\g<p>"),
        (_BLOCK + r"mlp\.c_proj\.(?P<p>weight|bias)", r"vision.blocks.\1.fc2.\g<p>"),
        (_TEXT + r"embeddings\.(?P<e>word|position|token_type)_embeddings\.weight", r"text.\g<e>_embeddings.weight"),
        (_TEXT + r"embeddings\.LayerNorm\.(?P<p>weight|bias)", r"text.embed_norm.\g<p>"),
        (r"bridgetower\.cross_modal_(?P<m>text|image)_transform\.(?P<p>weight|bias)", r"cross_\g<m>_transform.\g<p>"),
        (r"bridgetower\.token_type_embeddings\.weight", "modality_embeddings.weight"),
        (r"bridgetower\.cross_modal_(?P<m>text|image)_layernorm\.(?P<p>weight|bias)", r"cross_\g<m>_norm.\g<p>"),
        (r"bridgetower\.cross_modal_(?P<m>text|image)_pooler\.dense\.(?P<p>weight|bias)", r"\g<m>_pooler.\g<p>"),
        (
            r"bridgetower\.cross_modal_(?P<m>text|image)_link_tower\.(?P<i>\d+)\.LayerNorm\.(?P<p>weight|bias)",
            r"\g<m>_link_towers.\g<i>.norm.\g<p>",
        ),
        (
            r"bridgetower\.cross_modal_(?P<m>text|image)_link_tower\.(?P<i>\d+)\.(?P<s>scaled_factor|beta)",
            r"\g<m>_link_towers.\g<i>.\g<s>",
        ),
        # A shared link tower is one module in HF; ours is a one-element list.
        (r"bridgetower\.cross_modal_(?P<m>text|image)_link_tower\.LayerNorm\.(?P<p>weight|bias)", r"\g<m>_link_towers.0.norm.\g<p>"),
        (r"bridgetower\.cross_modal_(?P<m>text|image)_link_tower\.(?P<s>scaled_factor|beta)", r"\g<m>_link_towers.0.\g<s>"),
        (r"itm_score\.fc\.(?P<p>weight|bias)", r"itm_head.\g<p>"),
        (r"itc_(?P<h>text|image|cross_modal)_head\.fc\.(?P<p>weight|bias)", r"itc_\g<h>_head.\g<p>"),
        (r"logit_scale", "log_logit_scale"),
    ]
    for hf_part, ours in _LAYER_PARTS:
        hf_part = hf_part.replace("(query|key|value)", "(?P<p1>query|key|value)")
        rules.append((_TEXT + r"encoder\.layer\.(?P<l>\d+)\." + hf_part + r"\.(?P<p>weight|bias)",
                      r"text.layers.\g<l>." + ours + r".\g<p>"))
        rules.append((r"bridgetower\.cross_modal_(?P<m>text|image)_layers\.(?P<l>\d+)\." + hf_part + r"\.(?P<p>weight|bias)",
                      r"cross_\g<m>_layers.\g<l>." + ours + r".\g<p>"))
    return [(re.compile(pattern + r"\Z"), template) for pattern, template in rules]


NAME_MAP = _build_name_map()

# Keys of HF checkpoints that BridgeTower's retrieval/contrastive forward never reads.
IGNORED_KEYS = [
    re.compile(r"bridgetower\.text_model\.pooler\..*"),  # the text tower's own pooler
    re.compile(r"bridgetower\.vision_model\.visual\.ln_separate\..*"),  # only in HF's standalone vision forward
    re.compile(r"mlm_score\..*"),  # masked-LM head of *-itm-mlm checkpoints
    re.compile(r".*\.(position_ids|token_type_ids)"),  # buffers older HF versions saved
]

# Our parameters that a checkpoint may lack: they start from the seeded initialisation instead.
HEAD_PREFIXES = ("itm_head.", "itc_text_head.", "itc_image_head.", "itc_cross_modal_head.", "log_logit_scale")
_HEAD_KEYS = ("itm_score.", "mlm_score.", "itc_", "logit_scale")


def hf_to_ours(name: str) -> str | None:
    """Our parameter name for the HF checkpoint key ``name`` (with ``bridgetower.`` prefix), or None."""
    for pattern, template in NAME_MAP:
        match = pattern.match(name)
        if match:
            return match.expand(template)
    return None


@dataclass
class ConversionReport:
    sources: list[str]
    converted: int = 0
    ignored: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"sources": self.sources, "converted": self.converted, "ignored": self.ignored, "fresh": self.fresh}


def _linear_weight_names(model: nn.Layer) -> set[str]:
    return {f"{name}.weight" for name, layer in model.named_sublayers() if isinstance(layer, nn.Linear)}


def convert_state_dict(
    hf_state: Mapping[str, np.ndarray], model: BridgeTowerForRetrieval, report: ConversionReport | None = None
) -> dict[str, np.ndarray]:
    """HF keys/arrays -> our state dict for ``model`` (Linear weights transposed, conv weights not).

    Unknown keys, shape mismatches and missing non-head weights raise :class:`ConversionError`;
    missing heads keep ``model``'s current values and are listed in ``report.fresh``.
    """
    report = report if report is not None else ConversionReport(sources=[])
    target = {name: list(value.shape) for name, value in model.state_dict().items()}
    linear = _linear_weight_names(model)
    converted: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    unknown = []
    for key in sorted(hf_state):
        name = key if key.startswith("bridgetower.") or key.startswith(_HEAD_KEYS) else "bridgetower." + key
        if any(pattern.fullmatch(name) for pattern in IGNORED_KEYS):
            report.ignored.append(key)
            continue
        ours = hf_to_ours(name)
        if ours is None or ours not in target:
            unknown.append(f"{key}" + ("" if ours is None else f" (-> {ours}, which this config does not have)"))
            continue
        value = np.asarray(hf_state[key], dtype=np.float32)
        if ours in linear and value.ndim == 2:
            value = value.T
        if ours == "log_logit_scale" and value.size == 1:
            value = value.reshape([1])
        if list(value.shape) != target[ours]:
            raise ConversionError(
                f"checkpoint key {key!r} -> {ours!r}: shape {list(np.shape(hf_state[key]))} "
                f"(as ours {list(value.shape)}) does not match the model's {target[ours]}"
            )
        if ours in converted:
            raise ConversionError(f"checkpoint keys {origin[ours]!r} and {key!r} both map to {ours!r}")
        converted[ours] = np.ascontiguousarray(value)
        origin[ours] = key
    if unknown:
        raise ConversionError(f"unknown checkpoint keys ({len(unknown)}): {', '.join(unknown[:10])}")
    missing = sorted(set(target) - set(converted))
    fresh = [name for name in missing if name.startswith(HEAD_PREFIXES)]
    lacking = [name for name in missing if not name.startswith(HEAD_PREFIXES)]
    if lacking:
        raise ConversionError(f"checkpoint lacks {len(lacking)} weights of the model: {', '.join(lacking[:10])}")
    report.fresh.extend(fresh)
    report.converted += len(converted)
    return converted


def config_from_hf(hf_config: Mapping[str, Any]) -> BridgeTowerConfig:
    """Our config from an HF ``BridgeTowerConfig`` dict (``config.json``); HF defaults fill the gaps."""
    hf_config = dict(hf_config)
    top = {
        key: hf_config[key]
        for key in (
            "share_cross_modal_transformer_layers", "hidden_act", "hidden_size", "initializer_factor",
            "layer_norm_eps", "share_link_tower_layers", "link_tower_type", "num_attention_heads",
            "num_hidden_layers", "init_layernorm_from_vision_encoder", "contrastive_hidden_size",
            "logit_scale_init_value", "tie_word_embeddings",
        )
        if key in hf_config
    }
    text = hf_config.get("text_config") or hf_config.get("text_config_dict") or {}
    vision = hf_config.get("vision_config") or hf_config.get("vision_config_dict") or {}
    return BridgeTowerConfig(text_config=text, vision_config=vision, **top)


_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")


def _load_weight_file(path: Path) -> dict[str, np.ndarray]:
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        return dict(load_file(str(path)))
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ConversionError(f"{path}: reading a torch checkpoint needs torch installed") from exc
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConversionError(f"{path}: not a state dict")
    return {key: value.detach().float().numpy() for key, value in state.items() if hasattr(value, "detach")}


def _load_source(source: Path) -> tuple[dict[str, np.ndarray], dict[str, Any] | None]:
    """The state dict and (when next to it) the HF config of a checkpoint directory or file."""
    if source.is_dir():
        config_path = source / "config.json"
        found = next((source / name for name in _WEIGHT_FILES if (source / name).is_file()), None)
        if found is None:
            raise ConversionError(f"{source}: no {' / '.join(_WEIGHT_FILES)} in the directory")
        if found.name.endswith(".index.json"):
            shards = sorted(set(json.loads(found.read_text(encoding="utf-8"))["weight_map"].values()))
            state: dict[str, np.ndarray] = {}
            for shard in shards:
                state.update(_load_weight_file(source / shard))
        else:
            state = _load_weight_file(found)
    elif source.is_file():
        config_path = source.parent / "config.json"
        state = _load_weight_file(source)
    else:
        raise ConversionError(f"{source}: checkpoint not found")
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else None
    return state, config


def _merge(states: Sequence[tuple[str, Mapping[str, np.ndarray]]]) -> dict[str, np.ndarray]:
    merged: dict[str, np.ndarray] = {}
    where: dict[str, str] = {}
    for source, state in states:
        for key, value in state.items():
            if key in merged:
                if merged[key].shape != value.shape or not np.array_equal(merged[key], value):
                    raise ConversionError(f"checkpoint key {key!r} differs between {where[key]} and {source}")
                continue
            merged[key], where[key] = value, source
    return merged


def _roberta_tokenizer(directory: Path | None) -> RobertaBPETokenizer | None:
    if directory is None or not ((directory / "vocab.json").is_file() and (directory / "merges.txt").is_file()):
        return None
    return RobertaBPETokenizer(vocab_file=str(directory / "vocab.json"), merges_file=str(directory / "merges.txt"))


def convert_bridgetower_checkpoint(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    config: str | os.PathLike | Mapping[str, Any] | None = None,
    seed: int = 0,
) -> Path:
    """Convert HF BridgeTower checkpoint(s) into a model directory :data:`FAMILY` loads.

    ``source`` is an HF directory (``config.json`` + ``model.safetensors`` / ``pytorch_model.bin``,
    e.g. a ``BridgeTowerForImageAndTextRetrieval`` or ``BridgeTowerForContrastiveLearning`` save) or
    a state-dict file, or a list of them whose state dicts are merged (shared keys must agree), so
    the ITM head of a retrieval checkpoint and the ITC heads of a contrastive one end up together.
    ``config`` (dict or ``config.json`` path) is needed when no ``config.json`` sits next to the
    first source. Heads absent from every source start from the ``seed`` initialisation and are
    listed under ``conversion.fresh`` in the model info. The RoBERTa tokenizer (``vocab.json`` +
    ``merges.txt``) comes from ``tokenizer_dir`` or else from the first source directory holding one.
    """
    sources = [Path(os.fspath(s)).expanduser() for s in ([source] if isinstance(source, (str, os.PathLike)) else source)]
    if not sources:
        raise ConversionError("no checkpoint given")
    loaded = [(str(s), *_load_source(s)) for s in sources]
    if isinstance(config, (str, os.PathLike)):
        hf_config = json.loads(Path(config).read_text(encoding="utf-8"))
    elif config is not None:
        hf_config = dict(config)
    else:
        hf_config = next((c for _, _, c in loaded if c is not None), None)
    if hf_config is None:
        raise ConversionError(f"{sources[0]}: no config.json next to the checkpoint; pass config=")
    ours = config_from_hf(hf_config)
    state = _merge([(name, st) for name, st, _ in loaded])
    report = ConversionReport(sources=[str(s) for s in sources])
    model = seeded_build(seed, lambda: BridgeTowerForRetrieval(ours))
    converted = convert_state_dict(state, model, report)
    model.set_state_dict({name: paddle.to_tensor(value) for name, value in converted.items()})
    model.eval()
    candidates = [Path(os.fspath(tokenizer_dir)).expanduser()] if tokenizer_dir is not None else [
        s if s.is_dir() else s.parent for s in sources
    ]
    tokenizer = next((t for t in map(_roberta_tokenizer, candidates) if t is not None), None)
    if tokenizer_dir is not None and tokenizer is None:
        raise ConversionError(f"{tokenizer_dir}: no vocab.json + merges.txt (RoBERTa BPE tokenizer)")
    extra = {"init": "converted", "conversion": report.as_dict()}
    return FAMILY.save_atomic(model, tokenizer, out_dir, extra_info=extra)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vlretrieval.models.bridgetower convert --checkpoint PATH --out DIR``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m vlretrieval.models.bridgetower", description=main.__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="convert a Hugging Face (torch) BridgeTower checkpoint")
    convert.add_argument("--checkpoint", action="append", required=True,
                         help="HF model directory or state-dict file; repeat to merge heads from several")
    convert.add_argument("--out", type=Path, required=True, help="model directory to write")
    convert.add_argument("--tokenizer", default=None, help="directory with vocab.json + merges.txt")
    convert.add_argument("--config", default=None, help="HF config.json, when none sits next to the checkpoint")
    convert.add_argument("--seed", type=int, default=0, help="initialisation of heads the checkpoint lacks")
    args = parser.parse_args(argv)
    out = convert_bridgetower_checkpoint(
        args.checkpoint, args.out, tokenizer_dir=args.tokenizer, config=args.config, seed=args.seed
    )
    info = json.loads((out / MODEL_INFO_FILE).read_text(encoding="utf-8"))
    conversion = info["conversion"]
    print(f"converted {conversion['converted']} tensors into {out}")
    if conversion["fresh"]:
        print(f"freshly initialised (absent from the checkpoint): {', '.join(conversion['fresh'])}")
    if conversion["ignored"]:
        print(f"ignored (unused by the forward pass): {len(conversion['ignored'])} keys")
    if info.get("tokenizer_class") is None:
        print("warning: no tokenizer written; pass --tokenizer DIR with vocab.json + merges.txt")
    return 0
