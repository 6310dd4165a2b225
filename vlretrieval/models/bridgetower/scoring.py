"""Pair scoring of a BridgeTower model over one split: the ranking hook of the family."""

from __future__ import annotations

import os

import numpy as np
import paddle

from ...data.lmdb_store import SplitStore
from ...errors import ConfigError
from ..base import eval_context_length, load_model_dir
from ..registry import CROSS_ENCODER

DEFAULT_CACHE_BYTES = 2 << 30


class BridgeTowerPairScorer:
    """:class:`~vlretrieval.retrieval.rerank.PairScorer` of a BridgeTower model over one split.

    Every text and image is encoded uni-modally at most once per scorer when their layer states fit
    in ``cache_bytes`` (texts first: every :meth:`score` call reads a batch of them, while it reads
    a single image); what does not fit is encoded on each call, the last image kept. Each call then
    runs only the cross-modal layers and the ITM head. :meth:`itc_features` give BridgeTower's first
    stage (:func:`vlretrieval.retrieval.rerank.itc_candidate_positions`): the exact top ``k`` of the
    ITC similarities, to be re-ranked by :meth:`score`.
    """

    def __init__(self, model_dir: str | os.PathLike, split_dir: str | os.PathLike, *, batch_size: int = 256,
                 max_len: int | None = None, cache_bytes: int = DEFAULT_CACHE_BYTES):
        if batch_size < 1:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        self.family, self.model, self.tokenizer, _ = load_model_dir(model_dir, kind=CROSS_ENCODER,
                                                                    purpose="pair scoring")
        self.batch_size = int(batch_size)
        self.max_len = eval_context_length(model_dir, self.family, max_len)
        self.transform = self.family.image_transform(self.model, train=False)
        self.store = SplitStore(split_dir)
        texts = self.store.texts()
        self.text_ids = np.asarray([t.text_id for t in texts], dtype=np.int64)
        self.image_ids = np.asarray(self.store.image_ids(), dtype=np.int64)
        encoded = self.family.tokenize(self.tokenizer, [t.text for t in texts], max_len=self.max_len)
        self.input_ids = encoded["input_ids"]
        self.attention_mask = encoded["attention_mask"]
        self._lengths = self.attention_mask.sum(axis=1)

        config = self.model.config
        layers, width = config.num_hidden_layers, self.input_ids.shape[1]
        patches = (int(config.vision_config.image_size) // int(config.vision_config.patch_size)) ** 2 + 1
        text_bytes = 4 * layers * len(self.text_ids) * width * int(config.text_config.hidden_size)
        image_bytes = 4 * layers * len(self.image_ids) * patches * int(config.vision_config.hidden_size)
        self._text_cache = self._image_cache = None
        self._last_image: tuple[int, paddle.Tensor] | None = None
        if text_bytes <= cache_bytes:
            self._text_cache = self._encode_texts(np.arange(len(self.text_ids)))
            cache_bytes -= text_bytes
        if image_bytes <= cache_bytes:
            self._image_cache = self._encode_images(np.arange(len(self.image_ids)))
        self._text_features: np.ndarray | None = None
        self._image_features: np.ndarray | None = None

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> "BridgeTowerPairScorer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- uni-modal states -----------------------------------------------------------------------------

    def pixel_values(self, image_positions: np.ndarray) -> np.ndarray:
        """Evaluation-preprocessed pixels ``[n, 3, H, W]`` of the images at ``image_positions``."""
        return np.stack([self.transform(self.store.open_image(int(self.image_ids[p]))) for p in image_positions])

    @paddle.no_grad()
    def _encode_texts(self, positions: np.ndarray) -> paddle.Tensor:
        chunks = []
        for start in range(0, len(positions), self.batch_size):
            chunk = positions[start:start + self.batch_size]
            chunks.append(self.model.encode_texts_unimodal(
                paddle.to_tensor(self.input_ids[chunk]), paddle.to_tensor(self.attention_mask[chunk])
            ))
        return paddle.concat(chunks, axis=1)

    @paddle.no_grad()
    def _encode_images(self, positions: np.ndarray) -> paddle.Tensor:
        chunks = []
        for start in range(0, len(positions), self.batch_size):
            pixels = self.pixel_values(positions[start:start + self.batch_size])
            chunks.append(self.model.encode_images_unimodal(paddle.to_tensor(pixels)))
        return paddle.concat(chunks, axis=1)

    def _image_states(self, image_index: int) -> paddle.Tensor:
        if self._image_cache is not None:
            return self._image_cache[:, image_index:image_index + 1]
        if self._last_image is None or self._last_image[0] != image_index:
            self._last_image = (image_index, self._encode_images(np.asarray([image_index])))
        return self._last_image[1]

    def _text_states(self, positions: np.ndarray) -> paddle.Tensor:
        if self._text_cache is not None:
            return paddle.index_select(self._text_cache, paddle.to_tensor(positions, dtype="int64"), axis=1)
        return self._encode_texts(positions)

    # -- scoring --------------------------------------------------------------------------------------

    @paddle.no_grad()
    def score(self, image_index: int, text_indices: np.ndarray) -> np.ndarray:
        """ITM log-odds (``logit[match] - logit[no match]``) of image ``image_index`` with each text."""
        text_indices = np.asarray(text_indices, dtype=np.int64).reshape([-1])
        out = np.empty(len(text_indices), dtype=np.float32)
        image_states = self._image_states(int(image_index))
        for start in range(0, len(text_indices), self.batch_size):
            chunk = text_indices[start:start + self.batch_size]
            # Pad columns are masked everywhere, so cutting them off changes no score, only the cost.
            width = int(self._lengths[chunk].max())
            text_states = self._text_states(chunk)[:, :, :width]
            mask = paddle.to_tensor(self.attention_mask[chunk, :width])
            logits = self.model.itm_logits_from_states(text_states, mask, image_states)
            out[start:start + len(chunk)] = (logits[:, 1] - logits[:, 0]).numpy().astype(np.float32, copy=False)
        return out

    @paddle.no_grad()
    def itc_features(self) -> tuple[np.ndarray, np.ndarray]:
        """ITC features of every text ``[n_texts, d]`` and every image ``[n_images, d]``, split order."""
        if self._text_features is None:
            chunks = []
            for start in range(0, len(self.text_ids), self.batch_size):
                positions = np.arange(start, min(start + self.batch_size, len(self.text_ids)))
                # Only the last layer's [CLS] is read, so cached states are sliced rather than copied.
                states = self._text_cache[:, start:start + len(positions)] if self._text_cache is not None \
                    else self._encode_texts(positions)
                chunks.append(self.model.itc_text_features(states).numpy())
            self._text_features = np.concatenate(chunks).astype(np.float32, copy=False)
        if self._image_features is None:
            chunks = []
            for start in range(0, len(self.image_ids), self.batch_size):
                positions = np.arange(start, min(start + self.batch_size, len(self.image_ids)))
                states = self._image_cache[:, start:start + len(positions)] if self._image_cache is not None \
                    else self._encode_images(positions)
                chunks.append(self.model.itc_image_features(states).numpy())
            self._image_features = np.concatenate(chunks).astype(np.float32, copy=False)
        return self._text_features, self._image_features
