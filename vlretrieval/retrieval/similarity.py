"""Similarity from any saved dual encoder: image-text, text-text and image-image.

One tool serves prediction and similarity. Given images and texts it prints the feature shapes and,
for each image, the softmax probabilities over the texts (logit scale x cosine, as the model was
trained); given only texts or only images it prints their cosine similarity matrix.

    vlretrieval-similarity --model work/demo_cn/ernie_vil/models/finetuned \\
        --image cat.jpg --text "一只猫的照片" --text "一条狗的照片"

``--json`` prints one machine-readable document instead of tables.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import ConfigError, DataError
from .features import l2_normalize

IMAGE_TEXT = "image-text"
TEXT_TEXT = "text-text"
IMAGE_IMAGE = "image-image"
MODES = (IMAGE_TEXT, TEXT_TEXT, IMAGE_IMAGE)


def read_image(path: str | os.PathLike):
    """The image at ``path`` as a decoded PIL image; a missing or undecodable file names the path."""
    from PIL import Image, UnidentifiedImageError

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise DataError(str(path), f"cannot read image: {exc.strerror or exc}") from None
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # decode now, so a truncated file fails here and not inside the model
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(str(path), f"not a decodable image: {exc}") from None
    return image


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    shifted = logits - logits.max(axis=axis, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=axis, keepdims=True)


class SimilarityModel:
    """A saved dual encoder, ready to embed image files and texts into its normalised space."""

    def __init__(self, model_dir: str | os.PathLike, *, max_len: int | None = None):
        from ..models.base import eval_context_length, load_model_dir
        from ..models.registry import DUAL_ENCODER

        self.model_dir = Path(model_dir)
        self.family, self.model, self.tokenizer, _ = load_model_dir(self.model_dir, kind=DUAL_ENCODER,
                                                                    purpose="similarity")
        self.max_len = eval_context_length(self.model_dir, self.family, max_len)
        self.transform = self.family.image_transform(self.model, train=False)

    @property
    def logit_scale(self) -> float:
        return float(np.asarray(self.model.logit_scale().numpy()).reshape(-1)[0])

    def encode_images(self, paths: Sequence[str | os.PathLike]) -> np.ndarray:
        import paddle

        if not paths:
            return np.zeros((0, 0), np.float32)
        pixels = np.stack([self.transform(read_image(path)) for path in paths])
        with paddle.no_grad():
            features = self.model.encode_images(paddle.to_tensor(pixels))
        return l2_normalize(features.astype("float32").numpy())

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        import paddle

        if not texts:
            return np.zeros((0, 0), np.float32)
        for index, text in enumerate(texts):
            if not text.strip():
                raise DataError("texts", "empty text", record=f"text #{index + 1}")
        encoded = self.family.tokenize(self.tokenizer, texts, max_len=self.max_len)
        with paddle.no_grad():
            features = self.model.encode_texts(
                paddle.to_tensor(encoded["input_ids"]), attention_mask=paddle.to_tensor(encoded["attention_mask"])
            )
        return l2_normalize(features.astype("float32").numpy())


@dataclass
class SimilarityResult:
    mode: str
    images: list[str]
    texts: list[str]
    image_features: np.ndarray
    text_features: np.ndarray
    logit_scale: float
    cosine: np.ndarray  # rows and columns as the mode says: images x texts, texts x texts, images x images
    probabilities: np.ndarray | None  # image-text only: each image's softmax over the texts

    def to_json(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "mode": self.mode,
            "images": self.images,
            "texts": self.texts,
            "image_features_shape": list(self.image_features.shape) if self.images else None,
            "text_features_shape": list(self.text_features.shape) if self.texts else None,
            "logit_scale": self.logit_scale,
            "cosine": np.round(self.cosine.astype(np.float64), 6).tolist(),
        }
        if self.probabilities is not None:
            document["probabilities"] = np.round(self.probabilities.astype(np.float64), 6).tolist()
            document["best_text"] = [self.texts[i] for i in self.probabilities.argmax(axis=1)]
        return document


def infer_mode(num_images: int, num_texts: int, mode: str | None = None) -> str:
    """The comparison asked for; without an explicit ``mode`` it follows from what was given."""
    if mode is None:
        if num_images and num_texts:
            mode = IMAGE_TEXT
        elif num_texts:
            mode = TEXT_TEXT
        elif num_images:
            mode = IMAGE_IMAGE
        else:
            raise ConfigError("give at least one image or one text")
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    needs = {IMAGE_TEXT: (1, 1), TEXT_TEXT: (0, 1), IMAGE_IMAGE: (1, 0)}[mode]
    if num_images < needs[0] or num_texts < needs[1]:
        raise ConfigError(f"mode {mode} needs {'images and texts' if mode == IMAGE_TEXT else mode.split('-')[0] + 's'}")
    return mode


def compute_similarity(
    model: SimilarityModel,
    images: Sequence[str | os.PathLike] = (),
    texts: Sequence[str] = (),
    *,
    mode: str | None = None,
) -> SimilarityResult:
    mode = infer_mode(len(images), len(texts), mode)
    image_features = model.encode_images(images) if mode in (IMAGE_TEXT, IMAGE_IMAGE) else np.zeros((0, 0), np.float32)
    text_features = model.encode_texts(texts) if mode in (IMAGE_TEXT, TEXT_TEXT) else np.zeros((0, 0), np.float32)
    scale = model.logit_scale
    probabilities = None
    if mode == IMAGE_TEXT:
        cosine = image_features @ text_features.T
        probabilities = softmax(scale * cosine, axis=1)
    elif mode == TEXT_TEXT:
        cosine = text_features @ text_features.T
    else:
        cosine = image_features @ image_features.T
    return SimilarityResult(
        mode=mode,
        images=[str(path) for path in images] if mode != TEXT_TEXT else [],
        texts=list(texts) if mode != IMAGE_IMAGE else [],
        image_features=image_features,
        text_features=text_features,
        logit_scale=scale,
        cosine=cosine,
        probabilities=probabilities,
    )


def _table(title: str, rows: Sequence[str], columns: Sequence[str], values: np.ndarray, *, legend: bool = True) -> str:
    header = [title] + [f"[{j}]" for j in range(len(columns))]
    lines = ["\t".join(header)]
    for i, label in enumerate(rows):
        lines.append("\t".join([label] + [f"{value:.4f}" for value in values[i]]))
    if legend:
        lines += [f"[{j}] {column}" for j, column in enumerate(columns)]
    return "\n".join(lines)


def format_result(result: SimilarityResult) -> str:
    parts = []
    if result.images:
        parts.append(f"image features: shape {list(result.image_features.shape)}")
    if result.texts:
        parts.append(f"text features: shape {list(result.text_features.shape)}")
    if result.mode == IMAGE_TEXT:
        parts.append(f"logit scale: {result.logit_scale:.4f}")
        parts.append(_table("image \\ text probability", result.images, result.texts, result.probabilities))
        parts.append(_table("image \\ text cosine", result.images, result.texts, result.cosine, legend=False))
        for image, best in zip(result.images, result.probabilities.argmax(axis=1)):
            parts.append(f"best text for {image}: [{best}] {result.texts[best]}")
    elif result.mode == TEXT_TEXT:
        parts.append(_table("text \\ text cosine", [f"[{i}]" for i in range(len(result.texts))], result.texts, result.cosine))
    else:
        parts.append(_table("image \\ image cosine", result.images, result.images, result.cosine))
    return "\n".join(parts)


def _read_texts_file(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DataError(str(path), f"cannot read texts: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise DataError(str(path), f"not UTF-8 text: {exc}") from None
    return [line for line in lines if line.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vlretrieval-similarity",
        description="Image-text probabilities, text-text or image-image similarity from a saved dual encoder.",
    )
    parser.add_argument("--model", type=Path, required=True,
                        help="a model directory saved by vlretrieval, e.g. work/<dataset>/<model>/models/finetuned")
    parser.add_argument("--image", action="append", default=[], type=Path, help="an image file (repeatable)")
    parser.add_argument("--text", action="append", default=[], help="a text (repeatable)")
    parser.add_argument("--texts-file", type=Path, help="a UTF-8 file with one text per line")
    parser.add_argument("--mode", choices=MODES, help="default: image-text when both are given, else text-text or image-image")
    parser.add_argument("--max-len", type=int, help="text context length (default: the model's evaluation length)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    args = parser.parse_args(argv)

    texts = list(args.text) + (_read_texts_file(args.texts_file) if args.texts_file else [])
    mode = infer_mode(len(args.image), len(texts), args.mode)  # fail before loading the model
    result = compute_similarity(SimilarityModel(args.model, max_len=args.max_len), args.image, texts, mode=mode)
    if args.json:
        print(json.dumps(result.to_json(), ensure_ascii=False))
    else:
        print(format_result(result))
    return 0


def cli() -> int:
    from ..cli import run

    return run(main)


if __name__ == "__main__":
    sys.exit(cli())
