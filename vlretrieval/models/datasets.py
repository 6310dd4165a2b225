"""Datasets, collators and loaders that turn serialized splits
(:class:`vlretrieval.data.lmdb_store.SplitStore`) into model inputs.

* :class:`PairDataset`: one (image, caption) pair per item for contrastive training, with the
  training image transform and captions truncated to ``max_len`` tokens.
* :class:`ImageDataset` / :class:`TextDataset` and :func:`image_loader` / :func:`text_loader`:
  every image or every text of a split once, in store order, batched for feature extraction. Each
  item carries its own id, so batches stay correct with any number of workers and any order.

Datasets keep only the split's path; the LMDB is opened on first access in each process (the
DataLoader's workers included) through :func:`shared_store`, never used across a fork.
"""

from __future__ import annotations

import functools
import os
import random
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from paddle.io import DataLoader, Dataset

from ..data.lmdb_store import SplitStore
from ..errors import DataError
from .registry import get_family


# py-lmdb refuses to open one environment twice in a process, and a forked child inherits that
# refusal for every environment its parent had open; lmdb_store's fork hook closes the inherited
# environments in the child, so a child opens its own. Each process holds at most one store per
# split, shared by all datasets (which never keep a reference between calls); training datasets
# also close theirs before DataLoader workers fork.
_OPEN_STORES: dict[str, tuple[int, SplitStore]] = {}


@functools.lru_cache(maxsize=256)
def _store_key(split_dir: str | os.PathLike) -> str:
    # Cached: resolving walks the path with a syscall per component, and datasets ask per item.
    return str(Path(split_dir).resolve())


def shared_store(split_dir: str | os.PathLike) -> SplitStore:
    """This process's open :class:`SplitStore` of ``split_dir``, opened on first use."""
    key, pid = _store_key(split_dir), os.getpid()
    entry = _OPEN_STORES.get(key)
    if entry is not None and entry[0] == pid:
        return entry[1]
    store = SplitStore(split_dir)
    _OPEN_STORES[key] = (pid, store)
    return store


def release_store(split_dir: str | os.PathLike) -> None:
    """Close this process's store of ``split_dir`` (if open); the next access reopens it."""
    key = _store_key(split_dir)
    entry = _OPEN_STORES.get(key)
    if entry is not None and entry[0] == os.getpid():
        del _OPEN_STORES[key]
        entry[1].close()


def item_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The random stream of item ``index`` in ``epoch`` of a run seeded with ``seed``.

    A pure function of the three, so an item is augmented the same whichever process, thread or
    worker loads it, in whatever order, and a resumed run redraws exactly what an uninterrupted one
    would have drawn.
    """
    words = np.random.SeedSequence([int(seed) & (2**64 - 1), int(epoch), int(index)]).generate_state(2)
    return random.Random(int(words[0]) << 32 | int(words[1]))


class EpochSeededItems:
    """Datasets whose items draw their randomness (augmentation, negatives) from :func:`item_rng`.

    Training sets the run's seed and each epoch through :meth:`set_epoch` before it loads the
    epoch's first item; until then items draw from the module-level ``random``.
    """

    item_seed: int | None = None
    epoch: int = 0

    def set_epoch(self, epoch: int, seed: int) -> None:
        self.epoch, self.item_seed = int(epoch), int(seed)

    def rng_for(self, index: int):
        return random if self.item_seed is None else item_rng(self.item_seed, self.epoch, index)


TokenizeFn = Callable[[Sequence[str], int], dict]


class FamilyTokenizer:
    """``(texts, max_len) -> {"input_ids", "attention_mask"}`` through a family's truncating tokenize.

    Holds the family by name so it pickles (spawn-started workers pickle the dataset).
    """

    def __init__(self, family_name: str, tokenizer: Any):
        self.family_name = family_name
        self.tokenizer = tokenizer

    def __call__(self, texts: Sequence[str], max_len: int) -> dict:
        return get_family(self.family_name).tokenize(self.tokenizer, texts, max_len=max_len)


class PairDataset(EpochSeededItems, Dataset):
    """Item ``i`` is pair ``i`` of the split: transformed image and truncated caption ids.

    Returns a dict with ``pixel_values`` float32 ``[3, H, W]``, ``input_ids`` and ``attention_mask``
    int64 ``[L]`` (``L <= max_len``, unpadded), ``image_id`` and ``text_id``.
    """

    def __init__(self, split_dir: str | os.PathLike, transform: Callable, tokenize: TokenizeFn, *, max_len: int):
        super().__init__()
        if max_len < 2:
            raise ValueError(f"max_len must be at least 2 ([CLS] and [SEP]), got {max_len}")
        self.split_dir = Path(split_dir)
        self._num_pairs = shared_store(split_dir).num_pairs
        release_store(split_dir)  # workers fork later and must be able to open it themselves
        if self._num_pairs == 0:
            raise DataError(str(split_dir), "the split has no (image, text) pairs to train on")
        self.transform = transform
        self.tokenize = tokenize
        self.max_len = int(max_len)

    def __len__(self) -> int:
        return self._num_pairs

    def __getitem__(self, index: int) -> dict[str, Any]:
        store = shared_store(self.split_dir)
        pair = store.pair(int(index))
        try:
            image = store.open_image(pair.image_id)
        except KeyError:
            raise DataError(
                str(self.split_dir), f"pair {index} names image {pair.image_id}, which the split lacks",
                record=f"text_id={pair.text_id}",
            ) from None
        encoded = self.tokenize([pair.text], self.max_len)
        mask = encoded["attention_mask"][0]
        length = int(mask.sum())
        return {
            "pixel_values": self.transform(image, self.rng_for(index)),
            "input_ids": encoded["input_ids"][0][:length],
            "attention_mask": mask[:length],
            "image_id": pair.image_id,
            "text_id": pair.text_id,
        }


# Allocates a collated array: ``np.empty``, or an extraction slot's (memory shared with the
# process that consumes the batch), called as ``empty(shape, dtype)``.
ArrayAllocator = Callable[[tuple, Any], np.ndarray]


def pad_sequences(sequences: Sequence[np.ndarray], pad_value: int, *, empty: ArrayAllocator = np.empty) -> np.ndarray:
    """Right-pad 1-D int arrays to the longest into one ``int64`` matrix."""
    width = max(len(s) for s in sequences)
    out = empty((len(sequences), width), np.int64)
    out.fill(pad_value)
    for row, seq in enumerate(sequences):
        out[row, : len(seq)] = seq
    return out


class PairCollator:
    """Stacks :class:`PairDataset` items into the model inputs ``pixel_values``, ``input_ids``, ``attention_mask``.

    Ids are dropped by default because the Trainer passes every batch key to the model.
    """

    def __init__(self, pad_token_id: int = 0, *, keep_ids: bool = False):
        self.pad_token_id = int(pad_token_id)
        self.keep_ids = keep_ids

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
        batch = {
            "pixel_values": np.stack([item["pixel_values"] for item in items]).astype(np.float32, copy=False),
            "input_ids": pad_sequences([item["input_ids"] for item in items], self.pad_token_id),
            "attention_mask": pad_sequences([item["attention_mask"] for item in items], 0),
        }
        if self.keep_ids:
            batch["image_ids"] = np.asarray([item["image_id"] for item in items], dtype=np.int64)
            batch["text_ids"] = np.asarray([item["text_id"] for item in items], dtype=np.int64)
        return batch


# --------------------------------------------------------------------------------------------------
# Extraction: every image / every text once
# --------------------------------------------------------------------------------------------------


class ImageDataset(Dataset):
    """Item ``i`` is the ``i``-th image of the split (store order) as ``{"image_id", "pixel_values"}``."""

    def __init__(self, split_dir: str | os.PathLike, transform: Callable):
        super().__init__()
        self.split_dir = Path(split_dir)
        self.image_ids = shared_store(split_dir).image_ids()
        release_store(split_dir)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_id = self.image_ids[int(index)]
        return {"image_id": image_id, "pixel_values": self.transform(shared_store(self.split_dir).open_image(image_id))}


class TextDataset(Dataset):
    """Item ``i`` is the ``i``-th text of the split (file order), tokenized and truncated to ``max_len``."""

    def __init__(self, split_dir: str | os.PathLike, tokenize: TokenizeFn, *, max_len: int):
        super().__init__()
        self.split_dir = Path(split_dir)
        records = shared_store(split_dir).texts()
        release_store(split_dir)
        self.text_ids = [record.text_id for record in records]
        self.texts = [record.text for record in records]
        self.tokenize = tokenize
        self.max_len = int(max_len)

    def __len__(self) -> int:
        return len(self.text_ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        encoded = self.tokenize([self.texts[index]], self.max_len)
        mask = encoded["attention_mask"][0]
        length = int(mask.sum())
        return {
            "text_id": self.text_ids[index],
            "input_ids": encoded["input_ids"][0][:length],
            "attention_mask": mask[:length],
        }


def collate_images(items: Sequence[dict[str, Any]], *, empty: ArrayAllocator = np.empty) -> dict[str, np.ndarray]:
    pixels = empty((len(items), *np.shape(items[0]["pixel_values"])), np.float32)
    np.stack([item["pixel_values"] for item in items], out=pixels)
    return {"image_ids": _int64_column([item["image_id"] for item in items], empty), "pixel_values": pixels}


def _int64_column(values: Sequence[int], empty: ArrayAllocator) -> np.ndarray:
    column = empty((len(values),), np.int64)
    column[:] = values
    return column


class TextCollator:
    def __init__(self, pad_token_id: int = 0):
        self.pad_token_id = int(pad_token_id)

    def __call__(self, items: Sequence[dict[str, Any]], *, empty: ArrayAllocator = np.empty) -> dict[str, np.ndarray]:
        return {
            "text_ids": _int64_column([item["text_id"] for item in items], empty),
            "input_ids": pad_sequences([item["input_ids"] for item in items], self.pad_token_id, empty=empty),
            "attention_mask": pad_sequences([item["attention_mask"] for item in items], 0, empty=empty),
        }


def _loader(dataset: Dataset, collate: Callable, batch_size: int, num_workers: int) -> DataLoader:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers > 0:
        release_store(dataset.split_dir)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        drop_last=False,
        collate_fn=collate,
        num_workers=num_workers,
        return_list=True,
    )


def image_loader(
    split_dir: str | os.PathLike, transform: Callable, *, batch_size: int = 64, num_workers: int = 0
) -> DataLoader:
    """Batches ``{"image_ids": [n], "pixel_values": [n, 3, H, W]}`` (paddle tensors) of every image once."""
    return _loader(ImageDataset(split_dir, transform), collate_images, batch_size, num_workers)


def text_loader(
    split_dir: str | os.PathLike,
    tokenize: TokenizeFn,
    *,
    max_len: int,
    pad_token_id: int = 0,
    batch_size: int = 256,
    num_workers: int = 0,
) -> DataLoader:
    """Batches ``{"text_ids", "input_ids", "attention_mask"}`` (paddle tensors) of every text once."""
    return _loader(TextDataset(split_dir, tokenize, max_len=max_len), TextCollator(pad_token_id), batch_size, num_workers)
