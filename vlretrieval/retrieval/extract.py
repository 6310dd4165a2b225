"""Feature extraction: every image and every text of a serialized split through a dual encoder.

Output is a directory with ``images/`` and ``texts/`` feature sets (see :mod:`.features`):
float32, L2-normalised, with their ids, written atomically. Texts are truncated to the model's
context length (the reference extractor passes a length argument its tokenizer ignores, so long
texts there are never truncated).

Two engines run the encoders: ``dynamic`` loads the saved model and runs paddle's dynamic graph;
``inference`` runs a model exported by :mod:`vlretrieval.models.export` through ``paddle.inference``
(oneDNN with a set number of math-library threads on the CPU, the GPU when paddle has CUDA and
sees a device).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from ..errors import ConfigError
from ..models.base import checked_context_length
from ..io import atomic_directory, write_json
from .features import FeatureSet, export_reference_jsonl, l2_normalize, save_features

log = logging.getLogger(__name__)

IMAGES_DIR = "images"
TEXTS_DIR = "texts"
SUMMARY_FILE = "extraction.json"
ENGINES = ("dynamic", "inference")


def _encode_all(batches: Iterable[dict], ids_key: str, encode, total: int, what: str, progress: bool) -> FeatureSet:
    import paddle
    from tqdm import tqdm

    ids: list[np.ndarray] = []
    vectors: list[np.ndarray] = []
    with paddle.no_grad(), tqdm(total=total, desc=f"{what} features", unit=what, disable=not progress) as bar:
        for batch in batches:
            features = encode(batch)
            if isinstance(features, paddle.Tensor):
                features = features.astype("float32").numpy()
            ids.append(np.asarray(batch[ids_key]).astype(np.int64))
            vectors.append(np.asarray(features, dtype=np.float32))
            bar.update(len(ids[-1]))
    matrix = np.concatenate(vectors) if vectors else np.zeros((0, 0), np.float32)
    # Models normalise already; renormalising in float32 removes drift from lower-precision kernels.
    return FeatureSet(np.concatenate(ids) if ids else np.zeros(0, np.int64), l2_normalize(matrix))


@dataclass(frozen=True)
class _Encoders:
    """One engine's view of a model: what the data path needs, and the two encoders over batches."""

    family: Any
    tokenizer: Any
    image_size: int
    default_max_len: int
    max_text_len: int | None
    encode_images: Callable[[dict], Any]
    encode_texts: Callable[[dict], Any]
    device: str


def _dynamic_encoders(model_dir: str | os.PathLike) -> _Encoders:
    import paddle

    from ..models.base import load_model_dir
    from ..models.export import MANIFEST_FILE
    from ..models.registry import DUAL_ENCODER

    if (Path(model_dir) / MANIFEST_FILE).is_file():
        raise ConfigError(f"{model_dir}: an exported model; extract from it with the inference engine "
                          "(eval.engine: inference), or from its source model directory")
    family, model, tokenizer, info = load_model_dir(model_dir, kind=DUAL_ENCODER, purpose="feature extraction")
    longest = info.get("max_text_len")
    return _Encoders(
        family=family,
        tokenizer=tokenizer,
        image_size=family.image_size(model),
        # eval_max_len is the family's default clamped to the model's position table (max_text_len).
        default_max_len=int(info.get("eval_max_len") or family.eval_max_len),
        max_text_len=None if longest is None else int(longest),
        encode_images=lambda b: model.encode_images(b["pixel_values"]),
        encode_texts=lambda b: model.encode_texts(b["input_ids"], attention_mask=b["attention_mask"]),
        device=str(paddle.device.get_device()),
    )


def _inference_encoders(export_dir: str | os.PathLike, threads: int | None) -> _Encoders:
    from ..models.export import load_exported_model

    exported = load_exported_model(export_dir, threads=threads)
    encoder, manifest = exported.encoder, exported.encoder.manifest
    longest = manifest.get("max_text_len")
    return _Encoders(
        family=exported.family,
        tokenizer=exported.tokenizer,
        image_size=encoder.image_size,
        default_max_len=int(manifest["max_len"]),
        max_text_len=None if longest is None else int(longest),
        encode_images=lambda b: encoder.encode_images(b["pixel_values"].numpy()),
        encode_texts=lambda b: encoder.encode_texts(b["input_ids"].numpy(), b["attention_mask"].numpy()),
        device=f"cpu ({encoder.threads} threads)" if encoder.device == "cpu" else encoder.device,
    )


def extract_split(
    model_dir: str | os.PathLike,
    split_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    engine: str,
    threads: int | None = None,
    max_len: int | None = None,
    image_batch_size: int,
    text_batch_size: int,
    num_workers: int = 0,
    export_reference: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Write image and text features of ``split_dir`` under ``out_dir``; returns a summary.

    With ``engine="dynamic"`` ``model_dir`` is a saved model directory; with ``"inference"`` it is
    an exported one (:func:`vlretrieval.models.export.export_model`), run on the GPU when paddle
    has CUDA and sees a device, else on the CPU with ``threads`` math-library threads (default:
    every CPU this process may use). ``max_len``
    defaults to the model's evaluation context length (for an export, the one recorded at export).
    With ``export_reference`` the reference ``imgs.img_feat.jsonl`` / ``texts.txt_feat.jsonl``
    files are written too.
    """
    from ..models.datasets import FamilyTokenizer, image_loader, text_loader

    if engine == "dynamic":
        encoders = _dynamic_encoders(model_dir)
    elif engine == "inference":
        encoders = _inference_encoders(model_dir, threads)
    else:
        raise ConfigError(f"unknown extraction engine {engine!r}; known: {', '.join(ENGINES)}")
    family, tokenizer = encoders.family, encoders.tokenizer
    max_len = checked_context_length(max_len, encoders.default_max_len, encoders.max_text_len, model_dir)
    transform = family.image_transform(encoders.image_size, train=False)

    started = time.perf_counter()
    images = image_loader(split_dir, transform, batch_size=image_batch_size, num_workers=num_workers)
    image_set = _encode_all(images, "image_ids", encoders.encode_images, len(images.dataset), "image", progress)
    image_seconds = time.perf_counter() - started

    started = time.perf_counter()
    texts = text_loader(
        split_dir, FamilyTokenizer(family.name, tokenizer), max_len=max_len,
        pad_token_id=getattr(tokenizer, "pad_token_id", 0) or 0,
        batch_size=text_batch_size, num_workers=num_workers,
    )
    text_set = _encode_all(texts, "text_ids", encoders.encode_texts, len(texts.dataset), "text", progress)
    text_seconds = time.perf_counter() - started

    summary = {
        "model_dir": str(model_dir),
        "split_dir": str(split_dir),
        "family": family.name,
        "engine": engine,
        "device": encoders.device,
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
    log.info("extracted %d image and %d text features (dim %d, %s engine) into %s",
             len(image_set), len(text_set), image_set.dim, engine, out_dir)
    return summary


def feature_paths(features_dir: str | os.PathLike) -> tuple[Path, Path]:
    """(image features, text features) inside an extraction output directory."""
    root = Path(features_dir)
    return root / IMAGES_DIR, root / TEXTS_DIR
