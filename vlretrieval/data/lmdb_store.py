"""Serialized splits: a validated LMDB copy of one dataset split, and its read-only reader.

On-disk layout of ``out_dir/`` (format version ``FORMAT_VERSION``):

``imgs/`` (LMDB)
    ``b"<image_id>"`` (decimal ASCII) -> the image file bytes, exactly as decoded from the
    source's base64. Metadata keys start with ``__`` and so never collide with an id:
    ``__format__`` = ``vlretrieval.split``, ``__version__`` = ``1``, ``__kind__`` = ``imgs``,
    ``__num_images__`` (decimal), ``__image_ids__`` (JSON list, source order).

``pairs/`` (LMDB)
    ``b"<index>"`` (decimal, 0..num_samples-1) -> UTF-8 JSON
    ``{"image_id": int, "text_id": int, "text": str}``, one per (text, image) pair, in text order
    and then in the order of the text's ``image_ids``.
    ``b"text:<position>"`` (0..num_texts-1, file order) -> UTF-8 JSON
    ``{"text_id": int, "text": str, "image_ids": [int, ...]}``.
    Metadata: ``__format__``, ``__version__``, ``__kind__`` = ``pairs``, ``__num_samples__``,
    ``__num_texts__``, ``__text_ids__`` (JSON list, file order).

``texts.jsonl``
    The kept texts in the reference ``{"text_id", "text", "image_ids"}`` form: the gold file.
    Same line shape as a raw texts jsonl; U+0085/U+2028/U+2029 are written as JSON escapes so
    that even ``str.splitlines()`` sees one record per line.

``validation_report.json``
    :meth:`vlretrieval.data.validation.ValidationReport.to_dict`.

No value is pickled or base64-encoded, so reading a split never runs code from the data. The
environments have no ``lock.mdb``: a published split is never written again and is opened
lock-free (``lock=False``).
The directory is built under a temporary name and renamed into place, so a failed build leaves
either no ``out_dir`` or the previous one untouched.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import lmdb
from PIL import Image

from ..errors import DataError
from ..io import atomic_directory, write_json
from .importers import read_source
from .validation import ImageRecord, TextRecord, ValidationReport, validate_split_into

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "PairRecord",
    "SplitStore",
    "TextRecord",
    "serialize_split",
]

FORMAT_NAME = "vlretrieval.split"
FORMAT_VERSION = 1

IMAGES_DIR = "imgs"
PAIRS_DIR = "pairs"
TEXTS_FILE = "texts.jsonl"
REPORT_FILE = "validation_report.json"

KEY_FORMAT = b"__format__"
KEY_VERSION = b"__version__"
KEY_KIND = b"__kind__"
KEY_NUM_IMAGES = b"__num_images__"
KEY_IMAGE_IDS = b"__image_ids__"
KEY_NUM_SAMPLES = b"__num_samples__"
KEY_NUM_TEXTS = b"__num_texts__"
KEY_TEXT_IDS = b"__text_ids__"
TEXT_KEY_PREFIX = b"text:"

# Batches bound both the transaction count (each commit costs a page flush) and the memory a
# batch holds; large images hit the byte bound first.
_BATCH_ITEMS = 2000
_BATCH_BYTES = 64 << 20
_MIN_MAP_SIZE = 32 << 20


@dataclass(frozen=True)
class PairRecord:
    """One (image, text) pair of a serialized split."""

    image_id: int
    text_id: int
    text: str


def _image_key(image_id: int) -> bytes:
    return str(int(image_id)).encode("ascii")


def _text_key(position: int) -> bytes:
    return TEXT_KEY_PREFIX + str(position).encode("ascii")


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


# --------------------------------------------------------------------------------------------
# writing


class _LmdbWriter:
    """Batched writes into a new LMDB environment whose map grows when it fills up."""

    def __init__(self, path: Path, map_size: int):
        path.mkdir(parents=True, exist_ok=False)
        self.path = path
        self._map_size = max(_MIN_MAP_SIZE, int(map_size))
        # No per-commit fsync: the directory only becomes visible after close() syncs everything
        # and the atomic rename succeeds, so a crash mid-build leaves nothing that looks finished.
        # No lock file either: this process is the only one that ever writes here (the directory
        # is private until published), and published splits are opened lock-free.
        self._env = lmdb.open(
            str(path), map_size=self._map_size, subdir=True, sync=False, metasync=False, lock=False,
            readahead=False, meminit=False, max_dbs=0,
        )
        self._batch: list[tuple[bytes, bytes]] = []
        self._batch_bytes = 0
        self.entries = 0

    def put(self, key: bytes, value: bytes) -> None:
        self._batch.append((key, value))
        self._batch_bytes += len(key) + len(value)
        if len(self._batch) >= _BATCH_ITEMS or self._batch_bytes >= _BATCH_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self._batch:
            return
        while True:
            try:
                with self._env.begin(write=True) as txn:
                    _consumed, added = txn.cursor().putmulti(self._batch, dupdata=False, overwrite=False)
                break
            except lmdb.MapFullError:
                # The aborted transaction wrote nothing; retry the whole batch in a bigger map.
                self._map_size = max(self._map_size * 2, self._map_size + 4 * self._batch_bytes)
                self._env.set_mapsize(self._map_size)
        if added != len(self._batch):
            raise DataError(str(self.path),
                            f"{len(self._batch) - added} duplicate keys in one batch; nothing was published")
        self.entries += added
        self._batch = []
        self._batch_bytes = 0

    def close(self) -> None:
        self.flush()
        self._env.sync(True)
        self._env.close()

    def abort(self) -> None:
        self._batch = []
        self._env.close()


def _metadata(kind: str) -> list[tuple[bytes, bytes]]:
    return [
        (KEY_FORMAT, FORMAT_NAME.encode("ascii")),
        (KEY_VERSION, str(FORMAT_VERSION).encode("ascii")),
        (KEY_KIND, kind.encode("ascii")),
    ]


class _Progress:
    """Rate-limited progress lines on stderr, readable in workflow logs (no carriage returns)."""

    def __init__(self, label: str, enabled: bool, interval: float = 5.0):
        self.label = label
        self.enabled = enabled
        self.interval = interval
        self._start = time.monotonic()
        self._last = self._start

    def __call__(self, stage: str, done: int, total: int | None = None) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < self.interval:
            return
        self._last = now
        of = f"/{total}" if total else ""
        print(f"[{self.label}] {stage}: {done}{of} ({now - self._start:.0f}s)", file=sys.stderr, flush=True)

    def done(self, message: str) -> None:
        if self.enabled:
            print(f"[{self.label}] {message} ({time.monotonic() - self._start:.1f}s)", file=sys.stderr, flush=True)


class _ImagesWriter:
    """Receives kept images from validation, in source order, and finishes the ``imgs`` env."""

    def __init__(self, path: Path, expected_bytes: int, progress: _Progress):
        # Decoded images are ~3/4 of their base64 text; the rest of the estimate covers page
        # rounding for typical sizes, and the writer grows the map when an estimate falls short.
        self._writer = _LmdbWriter(path, expected_bytes + _MIN_MAP_SIZE)
        self._progress = progress
        self.ids: list[int] = []

    def __call__(self, _position: int, image: ImageRecord) -> None:
        self._writer.put(_image_key(image.image_id), image.data)
        self.ids.append(image.image_id)
        self._progress("images", len(self.ids))

    def finish(self) -> None:
        for key, value in _metadata("imgs") + [
            (KEY_NUM_IMAGES, str(len(self.ids)).encode("ascii")),
            (KEY_IMAGE_IDS, _json_bytes(self.ids)),
        ]:
            self._writer.put(key, value)
        self._writer.close()

    def abort(self) -> None:
        self._writer.abort()


def _text_json(text: TextRecord) -> str:
    # Encoded once per text and spliced into every value that carries it: json.dumps per pair
    # dominated the pairs build. The result equals json.dumps of the full dict.
    return json.dumps(text.text, ensure_ascii=False)


def _write_pairs(path: Path, texts: list[TextRecord], encoded: list[str], progress: _Progress) -> int:
    # Text values are small; estimate from the encoded sizes and let the writer grow if short.
    text_bytes = sum(len(e) * 3 + 24 * len(t.image_ids) + 48 for t, e in zip(texts, encoded))
    pair_bytes = sum((len(e) * 3 + 64) * len(t.image_ids) for t, e in zip(texts, encoded))
    entries = len(texts) + sum(len(t.image_ids) for t in texts)
    writer = _LmdbWriter(path, 2 * (text_bytes + pair_bytes) + entries * 64 + 16 * len(texts) + _MIN_MAP_SIZE)
    try:
        index = 0
        for position, (text, text_json) in enumerate(zip(texts, encoded)):
            ids = ",".join(map(str, text.image_ids))
            value = f'{{"text_id":{text.text_id},"text":{text_json},"image_ids":[{ids}]}}'
            writer.put(_text_key(position), value.encode("utf-8"))
            for image_id in text.image_ids:
                value = f'{{"image_id":{image_id},"text_id":{text.text_id},"text":{text_json}}}'
                writer.put(str(index).encode("ascii"), value.encode("utf-8"))
                index += 1
            progress("write pairs", position + 1, len(texts))
        for key, value in _metadata("pairs") + [
            (KEY_NUM_SAMPLES, str(index).encode("ascii")),
            (KEY_NUM_TEXTS, str(len(texts)).encode("ascii")),
            (KEY_TEXT_IDS, _json_bytes([t.text_id for t in texts])),
        ]:
            writer.put(key, value)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return index


# json.dumps(ensure_ascii=False) leaves these raw, and str.splitlines() breaks lines at them;
# escaping keeps the gold file one record per line for every reader and parses to the same text.
_LINE_BREAKING = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _write_texts_jsonl(path: Path, texts: list[TextRecord], encoded: list[str]) -> None:
    # Same line shape as raw.write_text_line (json.dumps defaults), so the gold file reads like
    # any raw texts jsonl.
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        for text, text_json in zip(texts, encoded):
            ids = ", ".join(map(str, text.image_ids))
            line = f'{{"text_id": {text.text_id}, "text": {text_json}, "image_ids": [{ids}]}}\n'
            if "\x85" in text_json or "\u2028" in text_json or "\u2029" in text_json:
                line = line.translate(_LINE_BREAKING)  # rare; translate() is slow on every line
            handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())


def serialize_split(
    fmt: str,
    source_dir: Path,
    split: str,
    out_dir: Path,
    *,
    entry: Mapping[str, Any],
    on_bad_record: str = "error",
    progress: bool = True,
    min_image_side: int = 1,
    workers: int | None = None,
) -> ValidationReport:
    """Validate one split of a source and write it as a serialized split at ``out_dir``.

    ``fmt``/``source_dir``/``split``/``entry`` are passed to
    :func:`vlretrieval.data.importers.read_source`; ``on_bad_record`` is the validation policy
    (``"error"`` or ``"skip"``), ``min_image_side`` and ``workers`` go to the validator.
    Images are validated and written in one streaming pass into a temporary directory beside
    ``out_dir``, which replaces ``out_dir`` only when everything succeeded: a bad record under
    the error policy, or any other failure, leaves no ``out_dir`` (or the previous one intact).
    Returns the report that is also written to ``out_dir/validation_report.json``.
    """
    out_dir = Path(out_dir)
    meter = _Progress(f"serialize {split}", progress)
    with read_source(fmt, Path(source_dir), split, entry) as source, atomic_directory(out_dir) as tmp:
        images = _ImagesWriter(tmp / IMAGES_DIR, source.input_bytes(), meter)
        try:
            texts, report = validate_split_into(
                source, images, policy=on_bad_record, min_image_side=min_image_side, workers=workers, progress=meter,
            )
            images.finish()
        except BaseException:
            images.abort()
            raise
        meter.done(
            f"validated and stored: images {report.images_kept}/{report.images_read} kept, "
            f"texts {report.texts_kept}/{report.texts_read} kept, {len(report.skipped)} skipped"
        )
        encoded = [_text_json(text) for text in texts]
        pairs = _write_pairs(tmp / PAIRS_DIR, texts, encoded, meter)
        if pairs != report.pairs:
            raise DataError(str(out_dir), f"wrote {pairs} pairs but validation counted {report.pairs}")
        _write_texts_jsonl(tmp / TEXTS_FILE, texts, encoded)
        write_json(tmp / REPORT_FILE, report.to_dict())
    meter.done(f"wrote {out_dir}: {report.images_kept} images, {report.texts_kept} texts, {report.pairs} pairs")
    return report


# --------------------------------------------------------------------------------------------
# reading


def _open_env(path: Path) -> lmdb.Environment:
    # lock=False: nothing ever writes a published split, so readers need no lock table; that
    # also works on read-only filesystems and leaves no shared state for a forked child to
    # corrupt.
    return lmdb.open(
        str(path), readonly=True, lock=False, readahead=False, meminit=False, subdir=True,
        max_readers=2048, max_spare_txns=4,
    )


class _EnvPool:
    """This process's read-only environments, shared by every store that reads the same files.

    py-lmdb refuses to open one environment twice in a process, so two stores on the same split
    must share it. Entries are keyed by the data file's inode: a split rebuilt in place is a new
    file and gets a fresh environment, while stores still holding the old one keep reading it.
    After fork() the child closes the inherited environments (for lock-free read-only ones that
    only unmaps the child's copy) and opens its own on first use.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[tuple[int, int], list[Any]] = {}  # key -> [env, refcount]

    @staticmethod
    def _key(path: Path) -> tuple[int, int]:
        st = (path / "data.mdb").stat()
        return st.st_dev, st.st_ino

    def acquire(self, path: Path) -> lmdb.Environment:
        with self._lock:
            key = self._key(path)
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = [_open_env(path), 0]
            entry[1] += 1
            return entry[0]

    def release(self, env: lmdb.Environment) -> None:
        with self._lock:
            for key, entry in list(self._entries.items()):
                if entry[0] is env:
                    entry[1] -= 1
                    if entry[1] <= 0:
                        del self._entries[key]
                        env.close()
                    return

    def reset_after_fork(self) -> None:
        self._lock = threading.Lock()  # the parent may have held it at fork time
        entries, self._entries = self._entries, {}
        for env, _refs in entries.values():
            try:
                env.close()
            except lmdb.Error:
                pass  # the child never uses it again either way


_ENV_POOL = _EnvPool()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_ENV_POOL.reset_after_fork)


class SplitStore:
    """Read-only access to a serialized split; cheap to create, safe to share with workers.

    Environments are opened per process on first use, so a store created in the parent can be
    handed to fork- or spawn-started DataLoader workers (it pickles as its path and metadata);
    stores on the same split in one process share one memory map. Use it as a context manager
    or call :meth:`close`.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._envs: tuple[lmdb.Environment, lmdb.Environment] | None = None
        self._pid: int | None = None
        self._texts_cache: list[TextRecord] | None = None
        for name in (IMAGES_DIR, PAIRS_DIR):
            if not (self.path / name / "data.mdb").is_file():
                raise DataError(str(self.path),
                                f"not a serialized split: {name}/data.mdb is missing (build it with serialize_split)")
        try:
            imgs, pairs = self._open()
            with imgs.begin() as txn:
                self._check_header(txn, IMAGES_DIR)
                self._num_images = self._read_int(txn, KEY_NUM_IMAGES, IMAGES_DIR)
                self._image_ids: list[int] = json.loads(self._require(txn, KEY_IMAGE_IDS, IMAGES_DIR))
            with pairs.begin() as txn:
                self._check_header(txn, PAIRS_DIR)
                self._num_pairs = self._read_int(txn, KEY_NUM_SAMPLES, PAIRS_DIR)
                self._num_texts = self._read_int(txn, KEY_NUM_TEXTS, PAIRS_DIR)
                self._text_ids: list[int] = json.loads(self._require(txn, KEY_TEXT_IDS, PAIRS_DIR))
            if len(self._image_ids) != self._num_images or len(self._text_ids) != self._num_texts:
                raise DataError(str(self.path), "metadata counts disagree with the id lists; the split is damaged")
        except BaseException:
            self.close()
            raise

    # -- environment handling

    def _open(self) -> tuple[lmdb.Environment, lmdb.Environment]:
        pid = os.getpid()
        if self._envs is not None and self._pid == pid:
            return self._envs
        # Handles from another process were closed by the pool's fork hook; just forget them.
        self._envs = None
        try:
            imgs = _ENV_POOL.acquire(self.path / IMAGES_DIR)
            try:
                pairs = _ENV_POOL.acquire(self.path / PAIRS_DIR)
            except BaseException:
                _ENV_POOL.release(imgs)
                raise
        except (lmdb.Error, OSError) as exc:
            raise DataError(str(self.path), f"cannot open the split's LMDB: {exc}") from None
        self._envs, self._pid = (imgs, pairs), pid
        return self._envs

    def close(self) -> None:
        """Release this store's environments; further reads reopen them."""
        if self._envs is not None and self._pid == os.getpid():
            for env in self._envs:
                _ENV_POOL.release(env)
        self._envs = None
        self._pid = None

    def __enter__(self) -> "SplitStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_envs"] = None
        state["_pid"] = None
        return state

    def __repr__(self) -> str:
        return (f"SplitStore({str(self.path)!r}, images={self._num_images}, texts={self._num_texts}, "
                f"pairs={self._num_pairs})")

    # -- metadata helpers

    def _require(self, txn: lmdb.Transaction, key: bytes, where: str) -> bytes:
        value = txn.get(key)
        if value is None:
            raise DataError(str(self.path / where), f"not a serialized split: the {key.decode()} entry is missing")
        return value

    def _read_int(self, txn: lmdb.Transaction, key: bytes, where: str) -> int:
        value = self._require(txn, key, where)
        try:
            return int(value.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            raise DataError(str(self.path / where),
                            f"the {key.decode()} entry is not a number: {value[:40]!r}") from None

    def _check_header(self, txn: lmdb.Transaction, where: str) -> None:
        fmt = txn.get(KEY_FORMAT)
        if fmt != FORMAT_NAME.encode("ascii"):
            hint = ""
            if txn.get(b"num_images") is not None or txn.get(b"num_samples") is not None:
                hint = " (it looks like a reference LMDB; import it with format reference_lmdb)"
            raise DataError(str(self.path / where), f"not a serialized split: no {FORMAT_NAME} format marker{hint}")
        version = txn.get(KEY_VERSION)
        if version != str(FORMAT_VERSION).encode("ascii"):
            raise DataError(
                str(self.path / where),
                f"unknown serialized split format version {version!r}; this code reads version "
                f"{FORMAT_VERSION}, rebuild the split",
            )
        kind = txn.get(KEY_KIND)
        if kind != where.encode("ascii"):
            raise DataError(str(self.path / where), f"expected the {where} LMDB here, found {kind!r}")

    # -- public API

    @property
    def num_images(self) -> int:
        return self._num_images

    @property
    def num_texts(self) -> int:
        return self._num_texts

    @property
    def num_pairs(self) -> int:
        return self._num_pairs

    def image_ids(self) -> list[int]:
        """Image ids in source order."""
        return list(self._image_ids)

    def text_ids(self) -> list[int]:
        """Text ids in file order (the order of :meth:`texts`)."""
        return list(self._text_ids)

    def image_bytes(self, image_id: int) -> bytes:
        """The image file bytes; ``KeyError`` for an id not in this split."""
        imgs, _ = self._open()
        with imgs.begin() as txn:
            value = txn.get(_image_key(image_id))
        if value is None:
            raise KeyError(f"image id {image_id} is not in the split at {self.path}")
        return value

    def open_image(self, image_id: int) -> Image.Image:
        """The image decoded and converted to RGB."""
        image = Image.open(io.BytesIO(self.image_bytes(image_id)))
        image.load()
        if image.mode == "P" and "transparency" in image.info:
            # Avoids Pillow's palette-transparency warning; the alpha is dropped just below.
            image = image.convert("RGBA")
        return image.convert("RGB") if image.mode != "RGB" else image

    def text(self, position: int) -> TextRecord:
        """The text at ``position`` (0-based, file order)."""
        if not 0 <= position < self._num_texts:
            raise IndexError(f"text position {position} out of range for {self._num_texts} texts")
        _, pairs = self._open()
        with pairs.begin() as txn:
            value = txn.get(_text_key(position))
        if value is None:
            raise DataError(str(self.path / PAIRS_DIR), f"text entry {position} is missing; the split is damaged")
        return self._decode_text(value)

    def texts(self) -> list[TextRecord]:
        """Every text in file order."""
        if self._texts_cache is None:
            _, pairs = self._open()
            keys = [_text_key(i) for i in range(self._num_texts)]
            with pairs.begin() as txn:
                found = dict(txn.cursor().getmulti(keys))
            if len(found) != len(keys):
                raise DataError(str(self.path / PAIRS_DIR), "text entries are missing; the split is damaged")
            self._texts_cache = [self._decode_text(found[key]) for key in keys]
        return list(self._texts_cache)

    def pair(self, index: int) -> PairRecord:
        """The pair at ``index`` (0-based, 0..num_pairs-1)."""
        if not 0 <= index < self._num_pairs:
            raise IndexError(f"pair index {index} out of range for {self._num_pairs} pairs")
        _, pairs = self._open()
        with pairs.begin() as txn:
            value = txn.get(str(index).encode("ascii"))
        if value is None:
            raise DataError(str(self.path / PAIRS_DIR), f"pair {index} is missing; the split is damaged")
        obj = json.loads(value)
        return PairRecord(obj["image_id"], obj["text_id"], obj["text"])

    @staticmethod
    def _decode_text(value: bytes) -> TextRecord:
        obj = json.loads(value)
        return TextRecord(obj["text_id"], obj["text"], tuple(obj["image_ids"]))


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``python -m vlretrieval.data.lmdb_store info DIR``: print a serialized split's counts."""
    parser = argparse.ArgumentParser(prog="python -m vlretrieval.data.lmdb_store", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="print the counts of a serialized split")
    info.add_argument("path", type=Path)
    args = parser.parse_args(argv)
    try:
        with SplitStore(args.path) as store:
            print(json.dumps({"path": str(store.path), "format_version": FORMAT_VERSION, "images": store.num_images,
                              "texts": store.num_texts, "pairs": store.num_pairs}, indent=2))
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
