"""Feature extraction: every image and every text of a serialized split through a dual encoder.

Output is a directory with ``images/`` and ``texts/`` feature sets (see :mod:`.features`):
float32, L2-normalised, with their ids, written atomically. Texts are truncated to the model's
context length (the reference extractor passes a length argument its tokenizer ignores, so long
texts there are never truncated).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..errors import ConfigError
from ..io import atomic_directory, write_json
from .features import FeatureSet, export_reference_jsonl, l2_normalize, save_features

log = logging.getLogger(__name__)

IMAGES_DIR = "images"
TEXTS_DIR = "texts"
SUMMARY_FILE = "extraction.json"


def load_dual_encoder(model_dir: str | os.PathLike) -> tuple[Any, Any, Any]:
    """(family, model in eval mode, tokenizer) of a model directory saved by the package."""
    from ..models.base import DUAL_ENCODER, read_model_info
    from ..models.registry import get_family

    info = read_model_info(model_dir)
    family = get_family(info["family"])
    if family.kind != DUAL_ENCODER:
        raise ConfigError(f"{model_dir}: feature extraction needs a dual encoder, {family.name} is a {family.kind}")
    model = family.load_model(model_dir)
    model.eval()
    return family, model, family.load_tokenizer(model_dir)


def _encode_all(batches: Iterable[dict], ids_key: str, encode, total: int, what: str, progress: bool) -> FeatureSet:
    import paddle
    from tqdm import tqdm

    ids: list[np.ndarray] = []
    vectors: list[np.ndarray] = []
    with paddle.no_grad(), tqdm(total=total, desc=f"{what} features", unit=what, disable=not progress) as bar:
        for batch in batches:
            features = encode(batch)
            ids.append(np.asarray(batch[ids_key]).astype(np.int64))
            vectors.append(features.astype("float32").numpy())
            bar.update(len(ids[-1]))
    matrix = np.concatenate(vectors) if vectors else np.zeros((0, 0), np.float32)
    # Models normalise already; renormalising in float32 removes drift from lower-precision kernels.
    return FeatureSet(np.concatenate(ids) if ids else np.zeros(0, np.int64), l2_normalize(matrix))


def extract_split(
    model_dir: str | os.PathLike,
    split_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    max_len: int | None = None,
    image_batch_size: int = 64,
    text_batch_size: int = 256,
    num_workers: int = 0,
    export_reference: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Write image and text features of ``split_dir`` under ``out_dir``; returns a summary.

    ``max_len`` defaults to the family's evaluation context length. With ``export_reference`` the
    reference ``imgs.img_feat.jsonl`` / ``texts.txt_feat.jsonl`` files are written too.
    """
    from ..training.data import FamilyTokenizer, image_loader, text_loader

    from ..models.base import read_model_info

    family, model, tokenizer = load_dual_encoder(model_dir)
    info = read_model_info(model_dir)
    # eval_max_len is the family's default clamped to the model's position table (max_text_len).
    max_len = int(max_len or info.get("eval_max_len") or family.eval_max_len)
    longest = info.get("max_text_len")
    if longest is not None and max_len > int(longest):
        raise ConfigError(f"{model_dir}: context length {max_len} exceeds the model's limit of {longest} tokens")
    transform = family.image_transform(model, train=False)

    started = time.perf_counter()
    images = image_loader(split_dir, transform, batch_size=image_batch_size, num_workers=num_workers)
    image_set = _encode_all(
        images, "image_ids", lambda b: model.encode_images(b["pixel_values"]),
        len(images.dataset), "image", progress,
    )
    image_seconds = time.perf_counter() - started

    started = time.perf_counter()
    texts = text_loader(
        split_dir, FamilyTokenizer(family.name, tokenizer), max_len=max_len,
        pad_token_id=getattr(tokenizer, "pad_token_id", 0) or 0,
        batch_size=text_batch_size, num_workers=num_workers,
    )
    text_set = _encode_all(
        texts, "text_ids", lambda b: model.encode_texts(b["input_ids"], attention_mask=b["attention_mask"]),
        len(texts.dataset), "text", progress,
    )
    text_seconds = time.perf_counter() - started

    summary = {
        "model_dir": str(model_dir),
        "split_dir": str(split_dir),
        "family": family.name,
        "num_images": len(image_set),
        "num_texts": len(text_set),
        "dim": image_set.dim,
        "max_len": max_len,
        "images_per_second": len(image_set) / image_seconds if image_seconds else None,
        "texts_per_second": len(text_set) / text_seconds if text_seconds else None,
    }
    with atomic_directory(out_dir) as tmp:
        save_features(tmp / IMAGES_DIR, image_set, kind="image")
        save_features(tmp / TEXTS_DIR, text_set, kind="text")
        if export_reference:
            export_reference_jsonl(image_set, tmp / "imgs.img_feat.jsonl", kind="image")
            export_reference_jsonl(text_set, tmp / "texts.txt_feat.jsonl", kind="text")
        write_json(tmp / SUMMARY_FILE, summary)
    log.info("extracted %d image and %d text features (dim %d) into %s",
             len(image_set), len(text_set), image_set.dim, out_dir)
    return summary


def feature_paths(features_dir: str | os.PathLike) -> tuple[Path, Path]:
    """(image features, text features) inside an extraction output directory."""
    root = Path(features_dir)
    return root / IMAGES_DIR, root / TEXTS_DIR
