"""The fine-tuned dual encoder as an MLflow model of its training run.

The saved model directory (weights, tokenizer, model info) is the model's artifact; a pyfunc wrapper
encodes images and texts through the same loading, preprocessing and encoders as feature extraction
(:mod:`vlretrieval.retrieval.extract`), so ``mlflow.pyfunc.load_model(...).predict(frame)`` gives the
features the ``extract_features`` rule writes. ``frame`` has an ``image`` column (encoded image bytes)
or a ``text`` column (a caption), one query per row; a row with both is refused. The result is a
``float32`` array of L2-normalised features, one row per input row.
"""

from __future__ import annotations

import io
import logging
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np

from ...errors import ConfigError, DataError

_logger = logging.getLogger(__name__)

MODEL_ARTIFACT_NAME = "model"
MODEL_DIR_ARTIFACT = "model_dir"
# What a served copy needs beside the project's own code (shipped with the model as code).
_RUNTIME_DISTRIBUTIONS = ("paddlepaddle", "paddlenlp", "mlflow", "numpy", "pandas", "pillow")


class DualEncoderModel(mlflow.pyfunc.PythonModel):
    """A pyfunc over a saved dual-encoder directory: rows of ``image`` bytes or ``text`` -> features."""

    def load_context(self, context) -> None:
        from ...models.base import checked_context_length
        from ...models.datasets import FamilyTokenizer, TextCollator
        from ...retrieval.extract import _dynamic_encoders

        model_dir = context.artifacts[MODEL_DIR_ARTIFACT]
        self.encoders = _dynamic_encoders(model_dir)
        family, tokenizer = self.encoders.family, self.encoders.tokenizer
        requested = (context.model_config or {}).get("max_len")
        self.max_len = checked_context_length(requested, self.encoders.default_max_len, self.encoders.max_text_len,
                                              model_dir)
        self.transform = family.image_transform(self.encoders.image_size, train=False)
        self.tokenize = FamilyTokenizer(family.name, tokenizer)
        self.collate_texts = TextCollator(getattr(tokenizer, "pad_token_id", 0) or 0)

    def predict(self, context, model_input, params=None) -> np.ndarray:
        import paddle

        from ...retrieval.features import l2_normalize

        images, texts = _split_queries(model_input)
        features: list[np.ndarray | None] = [None] * len(model_input)
        with paddle.no_grad():
            if images:
                pixels = np.stack([self.transform(_decode_image(data, row)) for row, data in images])
                encoded = self.encoders.encode_images({"pixel_values": pixels.astype(np.float32, copy=False)})
                for (row, _), vector in zip(images, _as_array(encoded)):
                    features[row] = vector
            if texts:
                items = []
                for row, text in texts:
                    # As a text of the split is prepared for extraction: truncated, then padded per batch.
                    tokens = self.tokenize([text], self.max_len)
                    length = int(tokens["attention_mask"][0].sum())
                    items.append({"text_id": row, "input_ids": tokens["input_ids"][0][:length],
                                  "attention_mask": tokens["attention_mask"][0][:length]})
                encoded = self.encoders.encode_texts(self.collate_texts(items))
                for (row, _), vector in zip(texts, _as_array(encoded)):
                    features[row] = vector
        if not features:
            return np.zeros((0, 0), np.float32)
        return l2_normalize(np.stack(features).astype(np.float32, copy=False))


def _as_array(encoded: Any) -> np.ndarray:
    import paddle

    if isinstance(encoded, paddle.Tensor):
        encoded = encoded.astype("float32").numpy()
    return np.asarray(encoded, dtype=np.float32)


def _split_queries(frame) -> tuple[list[tuple[int, bytes]], list[tuple[int, str]]]:
    columns = set(frame.columns)
    if not columns & {"image", "text"} or columns - {"image", "text"}:
        raise DataError("model input", f"expected an 'image' (bytes) or 'text' column, found {sorted(columns)}")
    images, texts = [], []
    for row, record in enumerate(frame.to_dict("records")):
        image, text = record.get("image"), record.get("text")
        has_image = isinstance(image, (bytes, bytearray))
        has_text = isinstance(text, str)
        if has_image == has_text:
            raise DataError("model input", "each row needs exactly one of an image (bytes) and a text (string)",
                            record=f"row {row}")
        if has_image:
            images.append((row, bytes(image)))
        else:
            texts.append((row, text))
    return images, texts


def _decode_image(data: bytes, row: int):
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError("model input", f"image is not a readable picture: {exc}", record=f"row {row}") from None
    return image


def _requirements() -> list[str]:
    pins = []
    for name in _RUNTIME_DISTRIBUTIONS:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return pins


def check_dual_encoder_dir(model_dir: Path) -> None:
    """Refuse, before anything is logged, a directory that is not a saved dual encoder."""
    # The family's spec, not the family: a built-in one is answered without importing Paddle.
    from ...models.base import read_model_info
    from ...models.registry import DUAL_ENCODER, family_spec

    name = read_model_info(model_dir)["family"]
    kind = family_spec(name).kind
    if kind != DUAL_ENCODER:
        raise ConfigError(f"{model_dir}: only a dual encoder is logged as an encoding model, {name} is a {kind}")


def log_dual_encoder(client, run_id: str, model_dir: Path, *, max_len: int | None,
                     registered_name: str | None) -> str:
    """Log ``model_dir`` as the pyfunc model of ``run_id`` (and register it under ``registered_name``);
    returns the model's URI. A run that already has a logged model keeps it."""
    run = client.get_run(run_id)
    for output in run.outputs.model_outputs if run.outputs else []:
        return f"models:/{output.model_id}"
    package_dir = Path(__file__).resolve().parents[2]
    previous_uri = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(client.tracking_uri)
    try:
        # log_model attaches the model to the active run; this resumes the existing one for the call.
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT_NAME,
                python_model=DualEncoderModel(),
                artifacts={MODEL_DIR_ARTIFACT: str(model_dir)},
                model_config={"max_len": max_len} if max_len is not None else None,
                code_paths=[str(package_dir)],
                pip_requirements=_requirements(),
                registered_model_name=registered_name,
            )
    finally:
        mlflow.set_tracking_uri(previous_uri)
    _logger.info("logged %s as model %s of run %s%s", model_dir, info.model_uri, run_id,
                 f", registered as {registered_name}" if registered_name else "")
    return info.model_uri
