"""Feature extraction: every image and every text of a serialized split through a dual encoder.

Output is a directory with ``images/`` and ``texts/`` feature sets (see :mod:`.features`):
float32, L2-normalised, with their ids, written atomically. Texts are truncated to the model's
context length (the reference extractor passes a length argument its tokenizer ignores, so long
texts there are never truncated).

Two engines run the encoders: ``dynamic`` loads the saved model and runs paddle's dynamic graph;
``inference`` runs a model exported by :mod:`vlretrieval.models.export` through ``paddle.inference``
(oneDNN with a set number of math-library threads on the CPU, the GPU when paddle has CUDA and
sees a device).

Batches are prepared (LMDB read, decode, transform, tokenize, collate) by worker processes while
the encoder runs on the previous ones, as a data loader's workers would. The queue is ordered and
bounded, so features come out in store order, identical to preparing each batch in turn, and at
most two batches per worker wait in memory.
"""

from __future__ import annotations

import collections
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import numpy as np

from ..errors import ConfigError, DataError
from ..models.base import checked_context_length
from ..io import atomic_directory, write_json
from .features import FeatureSet, export_reference_jsonl, l2_normalize, save_features

if TYPE_CHECKING:  # the datasets module imports paddle, which jobs that only read features do not need
    from ..models.datasets import ArrayAllocator

log = logging.getLogger(__name__)

IMAGES_DIR = "images"
TEXTS_DIR = "texts"
SUMMARY_FILE = "extraction.json"
ENGINES = ("dynamic", "inference")


# Each preparing process's dataset and collate function, set once when the process starts, and
# the shared buffer it leaves its batches' arrays in: (buffer, bytes per slot), or None.
_PREPARER: tuple | None = None
_SHARED: tuple | None = None
# Shared arrays start on cache-line boundaries.
_ALIGN = 64


@dataclass(frozen=True)
class _SharedArray:
    """Where a preparing process left one array of a batch in the shared buffer."""

    offset: int
    shape: tuple
    dtype: str


def _start_preparer(dataset: Any, collate: Callable[..., dict], ids: list[int], id_key: str,
                    location: str, shared: tuple | None) -> None:
    global _PREPARER, _SHARED
    _PREPARER = (dataset, collate, ids, id_key, location)
    _SHARED = shared


def _prepare_batch(start: int, stop: int, slot: int) -> dict:
    if _SHARED is None:
        return _build_batch(_PREPARER, start, stop)
    buffer, slot_bytes = _SHARED
    placing = _SlotArrays(buffer, slot * slot_bytes, (slot + 1) * slot_bytes)
    return placing.described(_build_batch(_PREPARER, start, stop, empty=placing.empty))


class _SlotArrays:
    """Lays a batch's arrays out one after another in its slot of the shared buffer, as far as they
    fit: the collate function builds them there, and the parent reads them in place instead of
    unpickling them from a pipe (at 64 images of 64 px that transfer cost more than preparing the
    images). Arrays that do not fit, or that the collate function built elsewhere, take the pipe."""

    def __init__(self, buffer, start: int, end: int):
        self.buffer, self.offset, self.end = buffer, start, end
        self.placed: dict[int, tuple[np.ndarray, _SharedArray]] = {}

    def empty(self, shape: tuple, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if dtype.hasobject or self.offset + nbytes > self.end:
            return np.empty(shape, dtype)
        array = np.ndarray(shape, dtype, buffer=self.buffer, offset=self.offset)
        self.placed[id(array)] = (array, _SharedArray(self.offset, tuple(array.shape), dtype.str))
        self.offset += -(-nbytes // _ALIGN) * _ALIGN
        return array

    def described(self, batch: dict) -> dict:
        described = {}
        for key, value in batch.items():
            array, where = self.placed.get(id(value), (None, None))
            described[key] = where if array is value else value
        return described


def _from_slot(batch: dict, buffer) -> dict:
    return {key: np.ndarray(value.shape, np.dtype(value.dtype), buffer=buffer, offset=value.offset)
            if isinstance(value, _SharedArray) else value for key, value in batch.items()}


def _build_batch(preparer: tuple, start: int, stop: int, *, empty: ArrayAllocator = np.empty) -> dict:
    dataset, collate, ids, id_key, location = preparer
    items = []
    for index in range(start, stop):
        try:
            items.append(dataset[index])
        except Exception as exc:
            raise DataError(location, f"cannot prepare this record for the encoder ({type(exc).__name__}: {exc})",
                            f"{id_key}={ids[index]}") from None
    return collate(items, empty=empty)


def prepared_batches(dataset: Any, collate: Callable[..., dict], *, batch_size: int, ids: list[int],
                     id_key: str, location: str, workers: int, slot_bytes: int = 0,
                     finished: list | None = None) -> Iterator[dict]:
    """``collate([dataset[i] for i in batch], empty=...)`` for consecutive batches of ``batch_size``, in
    order. ``collate`` allocates its arrays with ``empty(shape, dtype)`` (``np.empty`` or a slot's).

    With ``workers`` > 0 that many forked processes prepare the next batches while the caller
    consumes the current one; preparation is mostly Python (PIL calls, the transform, the
    tokenizer), which threads would serialise on the GIL against the encoder's own Python. At
    most ``2 * workers`` batches are in flight. The first batch is prepared here, before the
    workers start. With 0 each batch is prepared here when asked for.

    ``slot_bytes`` > 0 gives each batch in flight that many bytes of memory shared with the
    workers, where ``collate`` builds the batch's arrays (those that fit; the rest travel through a
    pipe).
    A batch's arrays are then views of its slot, which a later batch reuses: use them before
    asking for the next batch.

    An item that cannot be prepared raises :class:`DataError` naming ``location`` and the item's
    ``id_key``; the workers are then stopped before the error propagates. When every batch has been
    consumed the workers are told to exit and are waited for, unless a ``finished`` list is given:
    their processes are then appended to it without waiting, for the caller to ``join()`` later.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    bounds = [(start, min(start + batch_size, len(dataset))) for start in range(0, len(dataset), batch_size)]
    preparer = (dataset, collate, ids, id_key, location)
    if workers <= 0 or len(bounds) <= 1:
        for start, stop in bounds:
            yield _build_batch(preparer, start, stop)
        return
    import gc
    import mmap
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # Batch 0 is prepared here before the workers are forked: prepared while they started (and
    # while this process's pages were shared with them, so copied when first written), 64 images
    # took 15-20 ms against 9-12 ms here.
    first = _build_batch(preparer, *bounds[0])
    in_flight = 2 * workers
    # An anonymous shared mapping made before the fork is the same memory in every child.
    slot_bytes = -(-slot_bytes // _ALIGN) * _ALIGN  # every slot, and so its first array, on a cache line
    buffer = mmap.mmap(-1, in_flight * slot_bytes) if slot_bytes > 0 else None
    shared = None if buffer is None else (buffer, slot_bytes)
    # fork: the children inherit the dataset (no pickling, no re-import of paddle); the split's
    # LMDB handles are reopened per process (lmdb_store's fork hook).
    # Frozen objects are left alone by the children's garbage collector, which would otherwise
    # touch, and so copy, every page of this process's heap (paddle's included) in each child.
    gc.freeze()
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork"),
                               initializer=_start_preparer, initargs=(*preparer, shared))
    pending: collections.deque = collections.deque()
    following = 1  # batch 0 is prepared here

    def submit_next() -> None:
        nonlocal following
        if following < len(bounds):
            # Batch b uses slot (b - 1) % in_flight, and is submitted only once batch b - in_flight,
            # the slot's previous user, has been consumed.
            pending.append(pool.submit(_prepare_batch, *bounds[following], (following - 1) % in_flight))
            following += 1

    try:
        for _ in range(in_flight):
            submit_next()
        yield first
        del first  # the caller is done with it; keeping it would hold one more batch
        while pending:
            batch = pending.popleft().result()
            yield batch if buffer is None else _from_slot(batch, buffer)
            submit_next()
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    else:
        # The idle workers exit in the background; waiting for them here would stall the caller.
        # (shutdown without waiting forgets the processes, so they are taken first.)
        processes = list(pool._processes.values()) if finished is not None else []
        pool.shutdown(wait=finished is None)
        if finished is not None:
            finished.extend(processes)
    finally:
        gc.unfreeze()


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


def _batch_tensor_maker(paddle) -> Callable[[np.ndarray], Any]:
    """A function from a batch's array to the tensor the dynamic graph reads. On the CPU the tensor
    is the array's own memory (dlpack), which at 64 images of 64 px saves a copy costing 1-2% of
    the forward. That is safe because the encoders run eagerly under ``paddle.no_grad()`` (nothing
    keeps its inputs for a backward pass), they return before the batch's slot is reused, and they
    do not write to their inputs. On a GPU the array is copied to the device."""
    from paddle.utils.dlpack import from_dlpack

    if paddle.device.get_device() != "cpu":
        return paddle.to_tensor

    def as_tensor(array: np.ndarray):
        if array.flags.c_contiguous and array.flags.writeable:
            return from_dlpack(array.__dlpack__())
        return paddle.to_tensor(array)

    return as_tensor


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
    as_tensor = _batch_tensor_maker(paddle)
    return _Encoders(
        family=family,
        tokenizer=tokenizer,
        image_size=family.image_size(model),
        # eval_max_len is the family's default clamped to the model's position table (max_text_len).
        default_max_len=int(info.get("eval_max_len") or family.eval_max_len),
        max_text_len=None if longest is None else int(longest),
        encode_images=lambda b: model.encode_images(as_tensor(b["pixel_values"])),
        encode_texts=lambda b: model.encode_texts(as_tensor(b["input_ids"]),
                                                  attention_mask=as_tensor(b["attention_mask"])),
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
        encode_images=lambda b: encoder.encode_images(b["pixel_values"]),
        encode_texts=lambda b: encoder.encode_texts(b["input_ids"], b["attention_mask"]),
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
    prefetch_workers: int | None = None,
    export_reference: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Write image and text features of ``split_dir`` under ``out_dir``; returns a summary.

    With ``engine="dynamic"`` ``model_dir`` is a saved model directory; with ``"inference"`` it is
    an exported one (:func:`vlretrieval.models.export.export_model`), run on the GPU when paddle
    has CUDA and sees a device, else on the CPU with ``threads`` math-library threads (default:
    every CPU this process may use). ``prefetch_workers`` processes prepare batches while the
    encoder runs (default: one per CPU of the ``threads`` budget beyond the first, at least one;
    0 prepares each batch in turn, in this process). ``max_len`` defaults to the model's evaluation context length (for an export,
    the one recorded at export).
    With ``export_reference`` the reference ``imgs.img_feat.jsonl`` / ``texts.txt_feat.jsonl``
    files are written too.
    """
    from ..models.datasets import (
        FamilyTokenizer, ImageDataset, TextCollator, TextDataset, collate_images,
    )
    from ..models.export import default_threads

    if engine == "dynamic":
        encoders = _dynamic_encoders(model_dir)
    elif engine == "inference":
        encoders = _inference_encoders(model_dir, threads)
    else:
        raise ConfigError(f"unknown extraction engine {engine!r}; known: {', '.join(ENGINES)}")
    family, tokenizer = encoders.family, encoders.tokenizer
    max_len = checked_context_length(max_len, encoders.default_max_len, encoders.max_text_len, model_dir)
    transform = family.image_transform(encoders.image_size, train=False)

    if prefetch_workers is None:
        prefetch_workers = max(1, int(threads or default_threads()) - 1)
    where = str(split_dir)

    # Workers of the passes that are done: they exit while the next pass runs, and are joined here.
    finished: list = []
    try:
        started = time.perf_counter()
        images = ImageDataset(split_dir, transform)
        # Slots hold a batch's arrays: float32 pixels and int64 ids; int64 token ids, mask and ids.
        image_slot = image_batch_size * (3 * encoders.image_size ** 2 * 4 + 8) + 2 * _ALIGN
        image_batches = prepared_batches(images, collate_images, batch_size=image_batch_size, ids=images.image_ids,
                                         id_key="image_id", location=where, workers=prefetch_workers,
                                         slot_bytes=image_slot, finished=finished)
        image_set = _encode_all(image_batches, "image_ids", encoders.encode_images, len(images), "image", progress)
        image_seconds = time.perf_counter() - started

        started = time.perf_counter()
        texts = TextDataset(split_dir, FamilyTokenizer(family.name, tokenizer), max_len=max_len)
        text_batches = prepared_batches(texts, TextCollator(getattr(tokenizer, "pad_token_id", 0) or 0),
                                        batch_size=text_batch_size, ids=texts.text_ids, id_key="text_id",
                                        location=where, workers=prefetch_workers,
                                        slot_bytes=text_batch_size * (2 * max_len * 8 + 8) + 3 * _ALIGN,
                                        finished=finished)
        text_set = _encode_all(text_batches, "text_ids", encoders.encode_texts, len(texts), "text", progress)
        text_seconds = time.perf_counter() - started
    finally:
        for process in finished:
            process.join()

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
