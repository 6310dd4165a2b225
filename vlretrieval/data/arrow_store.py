"""ViLT-style Arrow files of a serialized split, and a memory-mapped reader for any such file.

ViLT, and BridgeTower after it, keep each split as one Arrow IPC *file* (the random-access format
of ``pa.ipc.new_file`` / ``RecordBatchFileWriter``) with one row per image:

=============  ======================  ====================================================
column         type                    value
=============  ======================  ====================================================
``image``      ``binary``              the encoded image file (JPEG, PNG, ...) as stored
``caption``    ``list<string>``        every caption of the image, in our text file order
``image_id``   ``string``              the image id (decimal for our splits)
``split``      ``string``              the split name (``train``, ``valid``, ``test``)
``text_ids``   ``list<int64>``         our text id of each caption, parallel to ``caption``
=============  ======================  ====================================================

``text_ids`` is ours: ViLT and BridgeTower select columns by name (``table["caption"]``,
``table["image"]``), so an extra column is never read by them. A text that names several images
appears in the caption list of each, with the same text id. ``text_ids[k]`` belongs to
``caption[k]``: ViLT's ``BaseDataset(remove_duplicate=True)`` (its default) rebuilds each list
through ``set()``, which reorders it, so map captions back to text ids through
:class:`ArrowSplit` (or with ``remove_duplicate=False``), not through ViLT's caption index.

Layout of ``out_dir/`` as written by :func:`serialize_arrow`:

``{name}_{split}.arrow``
    The Arrow IPC file, ViLT's naming (``coco_caption_karpathy_test.arrow`` is name
    ``coco_caption_karpathy``, split ``test``). The workflow uses the dataset name, so a
    BridgeTower data directory wants a symlink or ``--name`` with the name its dataset class
    expects. Schema metadata: ``vlretrieval.format`` = ``vlretrieval.arrow``,
    ``vlretrieval.version`` = ``1``, ``vlretrieval.split``.
``manifest.json``
    Counts, the file name, the source split directory and the batch sizes.

Rows are written in bounded record batches (at most ``batch_rows`` rows and about
``batch_bytes`` of image data each), so a build holds one batch of images at a time, and the
directory is staged and renamed into place (:func:`vlretrieval.io.atomic_directory`), so a
failed build leaves no ``out_dir`` or the previous one untouched.

Images that no text names (gallery distractors, kept by validation) get an empty caption list.
ViLT's text index skips such rows and its image-only index keeps them; :class:`ArrowSplit`
refuses them unless ``allow_empty_captions=True``, because in a training file they are usually a
mistake.
"""

from __future__ import annotations

import argparse
import bisect
import io
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from ..errors import DataError
from ..io import atomic_directory, write_json
from .lmdb_store import SplitStore, _Progress
from .validation import check_image_bytes

__all__ = [
    "ARROW_FORMAT",
    "ARROW_VERSION",
    "ArrowRow",
    "ArrowSplit",
    "MANIFEST_FILE",
    "arrow_file_name",
    "arrow_schema",
    "serialize_arrow",
]

ARROW_FORMAT = "vlretrieval.arrow"
ARROW_VERSION = 1
MANIFEST_FILE = "manifest.json"
VILT_COLUMNS = ("image", "caption", "image_id", "split")
TEXT_IDS_COLUMN = "text_ids"

# A batch is the unit the writer holds in memory and the reader's unit of random access; 64 MB
# keeps the writer small while leaving few enough batches that row lookup stays cheap.
DEFAULT_BATCH_ROWS = 1000
DEFAULT_BATCH_BYTES = 64 << 20


def arrow_file_name(name: str, split: str) -> str:
    """ViLT's file naming: ``{name}_{split}.arrow``."""
    return f"{name}_{split}.arrow"


def arrow_schema(split: str) -> pa.Schema:
    """The schema :func:`serialize_arrow` writes: ViLT's four columns, then ``text_ids``."""
    return pa.schema(
        [
            pa.field("image", pa.binary()),
            pa.field("caption", pa.list_(pa.string())),
            pa.field("image_id", pa.string()),
            pa.field("split", pa.string()),
            pa.field(TEXT_IDS_COLUMN, pa.list_(pa.int64())),
        ],
        metadata={
            "vlretrieval.format": ARROW_FORMAT,
            "vlretrieval.version": str(ARROW_VERSION),
            "vlretrieval.split": split,
        },
    )


# --------------------------------------------------------------------------------------------
# writing


class _BatchWriter:
    def __init__(self, writer: pa.ipc.RecordBatchFileWriter, schema: pa.Schema, split: str,
                 batch_rows: int, batch_bytes: int):
        self._writer = writer
        self._schema = schema
        self._split = split
        self._batch_rows = batch_rows
        self._batch_bytes = batch_bytes
        self._rows: list[tuple[bytes, list[str], str, list[int]]] = []
        self._bytes = 0
        self.batches = 0

    def add(self, image: bytes, captions: list[str], image_id: str, text_ids: list[int]) -> None:
        self._rows.append((image, captions, image_id, text_ids))
        self._bytes += len(image)
        if len(self._rows) >= self._batch_rows or self._bytes >= self._batch_bytes:
            self.flush()

    def flush(self) -> None:
        if not self._rows:
            return
        images, captions, ids, text_ids = zip(*self._rows)
        batch = pa.record_batch(
            [
                pa.array(images, pa.binary()),
                pa.array(captions, pa.list_(pa.string())),
                pa.array(ids, pa.string()),
                pa.array([self._split] * len(ids), pa.string()),
                pa.array(text_ids, pa.list_(pa.int64())),
            ],
            schema=self._schema,
        )
        self._writer.write_batch(batch)
        self.batches += 1
        self._rows = []
        self._bytes = 0


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def serialize_arrow(
    split_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    name: str,
    split: str | None = None,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    batch_bytes: int = DEFAULT_BATCH_BYTES,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the serialized split at ``split_dir`` as ``out_dir/{name}_{split}.arrow``.

    The source is a :class:`~vlretrieval.data.lmdb_store.SplitStore`, so the rows are exactly the
    records that passed validation, images in source order. ``split`` defaults to the name of
    ``split_dir``. Returns the manifest also written to ``out_dir/manifest.json``.
    """
    split_dir, out_dir = Path(split_dir), Path(out_dir)
    split = split or split_dir.name
    if batch_rows < 1 or batch_bytes < 1:
        raise ValueError(f"batch_rows and batch_bytes must be positive, got {batch_rows} and {batch_bytes}")
    file_name = arrow_file_name(name, split)
    meter = _Progress(f"arrow {split}", progress)
    schema = arrow_schema(split)
    with SplitStore(split_dir) as store, atomic_directory(out_dir) as tmp:
        # Texts are small next to the images; grouping them per image needs them all at once.
        by_image: dict[int, tuple[list[str], list[int]]] = {image_id: ([], []) for image_id in store.image_ids()}
        for text in store.texts():
            for image_id in text.image_ids:
                entry = by_image.get(image_id)
                if entry is None:
                    raise DataError(str(split_dir), f"text names image {image_id}, which the split does not hold; "
                                    "the split is damaged", record=f"text_id={text.text_id}")
                entry[0].append(text.text)
                entry[1].append(text.text_id)
        path = tmp / file_name
        captions = 0
        without = 0
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            batches = _BatchWriter(writer, schema, split, batch_rows, batch_bytes)
            for done, (image_id, (texts, text_ids)) in enumerate(by_image.items(), start=1):
                batches.add(store.image_bytes(image_id), texts, str(image_id), text_ids)
                captions += len(texts)
                without += not texts
                meter("images", done, store.num_images)
            batches.flush()
        _fsync(path)
        manifest = {
            "format": ARROW_FORMAT,
            "version": ARROW_VERSION,
            "file": file_name,
            "name": name,
            "split": split,
            "source": str(split_dir),
            "columns": schema.names,
            "images": store.num_images,
            "captions": captions,
            "texts": store.num_texts,
            "images_without_captions": without,
            "record_batches": batches.batches,
            "batch_rows": batch_rows,
            "batch_bytes": batch_bytes,
        }
        write_json(tmp / MANIFEST_FILE, manifest)
    meter.done(f"wrote {out_dir / file_name}: {manifest['images']} images, {captions} captions, "
               f"{batches.batches} record batches")
    return manifest


# --------------------------------------------------------------------------------------------
# reading


@dataclass(frozen=True)
class ArrowRow:
    """One row: an image with its captions."""

    image: bytes
    captions: list[str]
    image_id: str
    split: str | None
    text_ids: list[int] | None


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t)


def _first_true(mask: pa.Array) -> int:
    return pc.index(mask, True).as_py()


class _File:
    """One memory-mapped Arrow file, its schema checked."""

    def __init__(self, path: Path, check_images: bool, allow_empty_captions: bool, min_image_side: int):
        self.path = path
        self.source = None
        try:
            self.source = pa.memory_map(str(path), "r")
            reader = pa.ipc.open_file(self.source)
        except (pa.ArrowInvalid, OSError) as exc:
            if self.source is not None:
                self.source.close()  # the mapping would otherwise outlive the failed open
            raise DataError(str(path), f"not an Arrow IPC file: {exc}") from None
        try:
            self.schema = reader.schema
            self._check_schema()
            self.batches = [reader.get_batch(k) for k in range(reader.num_record_batches)]
            self.has_split = "split" in self.schema.names
            self.has_text_ids = TEXT_IDS_COLUMN in self.schema.names
            offset = 0
            for batch in self.batches:
                self._check_rows(batch, offset, allow_empty_captions)
                offset += batch.num_rows
            self.num_rows = offset
            if check_images:
                self._check_images(min_image_side)
        except BaseException:
            self.close()
            raise

    def _fail(self, problem: str, row: int | None = None) -> DataError:
        return DataError(str(self.path), problem, record=None if row is None else f"row {row}")

    def _check_schema(self) -> None:
        names = self.schema.names
        for name in set(names):
            if names.count(name) > 1:
                raise self._fail(f"column '{name}' appears {names.count(name)} times")
        missing = [c for c in ("image", "caption", "image_id") if c not in names]
        if missing:
            raise self._fail(f"missing column{'s' if len(missing) > 1 else ''} "
                             f"{', '.join(repr(c) for c in missing)} (found {names}); a ViLT caption file has "
                             f"{', '.join(VILT_COLUMNS)}")
        t = self.schema.field("image").type
        if not (pa.types.is_binary(t) or pa.types.is_large_binary(t)):
            raise self._fail(f"column 'image' has type {t}, expected binary (the encoded image bytes)")
        t = self.schema.field("caption").type
        if not (_is_list(t) and _is_string(t.value_type)):
            hint = " (one caption per row; ViLT files hold a list of captions per image)" if _is_string(t) else ""
            raise self._fail(f"column 'caption' has type {t}, expected list<string>{hint}")
        t = self.schema.field("image_id").type
        if not (_is_string(t) or pa.types.is_integer(t)):
            raise self._fail(f"column 'image_id' has type {t}, expected string or integer")
        if "split" in names and not _is_string(self.schema.field("split").type):
            raise self._fail(f"column 'split' has type {self.schema.field('split').type}, expected string")
        if TEXT_IDS_COLUMN in names:
            t = self.schema.field(TEXT_IDS_COLUMN).type
            if not (_is_list(t) and pa.types.is_integer(t.value_type)):
                raise self._fail(f"column '{TEXT_IDS_COLUMN}' has type {t}, expected list<int64>")

    def _check_rows(self, batch: pa.RecordBatch, offset: int, allow_empty_captions: bool) -> None:
        for name in ("image", "caption", "image_id") + (("split",) if "split" in batch.schema.names else ()):
            column = batch.column(name)
            if column.null_count:
                raise self._fail(f"column '{name}' is null", offset + _first_true(column.is_null()))
        captions = batch.column("caption")
        lengths = pc.list_value_length(captions)
        if not allow_empty_captions:
            empty = pc.equal(lengths, 0)
            if pc.any(empty).as_py():
                raise self._fail("column 'caption' is an empty list (an image without captions; pass "
                                 "allow_empty_captions=True to read image-only rows)", offset + _first_true(empty))
        flat = captions.flatten()
        if flat.null_count:
            rows = pc.list_parent_indices(captions)
            raise self._fail("column 'caption' holds a null caption",
                             offset + rows[_first_true(flat.is_null())].as_py())
        if TEXT_IDS_COLUMN in batch.schema.names:
            text_ids = batch.column(TEXT_IDS_COLUMN)
            mismatch = pc.fill_null(pc.not_equal(pc.list_value_length(text_ids), lengths), True)
            if pc.any(mismatch).as_py():
                raise self._fail(f"column '{TEXT_IDS_COLUMN}' does not have one id per caption",
                                 offset + _first_true(mismatch))
            if text_ids.flatten().null_count:
                raise self._fail(f"column '{TEXT_IDS_COLUMN}' holds a null id")

    def _check_images(self, min_image_side: int) -> None:
        row = 0
        for batch in self.batches:
            for value in batch.column("image"):
                problem = check_image_bytes(value.as_py(), min_image_side)
                if problem is not None:
                    raise self._fail(f"column 'image' does not hold a usable image: {problem}", row)
                row += 1

    def close(self) -> None:
        self.batches = []
        source = getattr(self, "source", None)
        if source is not None:
            source.close()


class ArrowSplit:
    """Memory-mapped, read-only access to ViLT-style Arrow files (ours, ViLT's or BridgeTower's).

    ``path`` is an ``.arrow`` file, or a directory whose ``*.arrow`` files are read in name
    order as one table (ViLT's ``concat_tables`` of ``cc_0.arrow``, ``cc_1.arrow``, ...). The
    schema and every row's nulls and caption counts are checked on opening; ``check_images``
    also decodes every image (slow: it reads the whole file). Image bytes are served from the
    page cache through the memory map, not copied into Arrow's memory pool.

    Rows are images; the flattened (image index, caption index) view of ViLT's ``index_mapper``
    is :attr:`index_mapper` / :meth:`pair`. The store pickles as its path and options, so it can
    be handed to DataLoader workers, which map the file again.
    """

    def __init__(self, path: str | os.PathLike, *, check_images: bool = False, allow_empty_captions: bool = False,
                 min_image_side: int = 1):
        self.path = Path(path)
        self._options = {"check_images": check_images, "allow_empty_captions": allow_empty_captions,
                         "min_image_side": min_image_side}
        self._open()

    def _open(self) -> None:
        if self.path.is_dir():
            paths = sorted(self.path.glob("*.arrow"))
            if not paths:
                raise DataError(str(self.path), "no .arrow file in this directory")
        elif self.path.is_file():
            paths = [self.path]
        else:
            raise DataError(str(self.path), "no such Arrow file or directory")
        self._files: list[_File] = []
        try:
            for p in paths:
                self._files.append(_File(p, **self._options))
        except BaseException:
            self.close()
            raise
        self._batches: list[tuple[_File, pa.RecordBatch]] = [(f, b) for f in self._files for b in f.batches]
        # Column arrays fetched once: RecordBatch.column() builds a new wrapper on every call,
        # which cost more than the lookup itself. Plain lists keep bisect off numpy scalars.
        self._columns: list[dict[str, pa.Array]] = [
            {name: b.column(name) for name in b.schema.names} for _f, b in self._batches
        ]
        self._starts: list[int] = np.cumsum([0] + [b.num_rows for _f, b in self._batches]).tolist()
        self._num_rows = self._starts[-1]
        self.has_text_ids = all(f.has_text_ids for f in self._files)
        lengths = np.concatenate(
            [pc.list_value_length(b.column("caption")).to_numpy(zero_copy_only=False) for _f, b in self._batches]
            or [np.zeros(0, np.int32)]
        ).astype(np.int64)
        # ViLT's index_mapper as two arrays: caption k of the split is caption
        # caption_index[k] of image image_index[k].
        self.image_index = np.repeat(np.arange(self._num_rows, dtype=np.int64), lengths)
        first = np.repeat(np.cumsum(lengths) - lengths, lengths)
        self.caption_index = np.arange(len(self.image_index), dtype=np.int64) - first
        self._caption_lengths = lengths

    # -- lifecycle

    def close(self) -> None:
        for f in getattr(self, "_files", []):
            f.close()
        self._files = []
        self._batches = []
        self._columns = []

    def __enter__(self) -> "ArrowSplit":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "options": self._options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = state["path"]
        self._options = state["options"]
        self._open()

    def __repr__(self) -> str:
        return f"ArrowSplit({str(self.path)!r}, images={self._num_rows}, captions={self.num_captions})"

    # -- sizes

    def __len__(self) -> int:
        return self._num_rows

    @property
    def num_images(self) -> int:
        return self._num_rows

    @property
    def num_captions(self) -> int:
        return len(self.image_index)

    @property
    def files(self) -> list[Path]:
        return [f.path for f in self._files]

    # -- rows

    def _locate(self, row: int) -> tuple[_File, dict[str, pa.Array], int]:
        if not 0 <= row < self._num_rows:
            raise IndexError(f"row {row} out of range for {self._num_rows} rows")
        k = bisect.bisect_right(self._starts, row) - 1
        return self._batches[k][0], self._columns[k], row - self._starts[k]

    def image_buffer(self, row: int) -> pa.Buffer:
        """The image bytes of ``row`` without copying: a view of the memory map."""
        _f, batch, j = self._locate(row)
        return batch["image"][j].as_buffer()

    def image_bytes(self, row: int) -> bytes:
        """The encoded image of ``row`` as stored."""
        _f, batch, j = self._locate(row)
        return batch["image"][j].as_py()

    def open_image(self, row: int) -> Image.Image:
        """The image of ``row`` decoded and converted to RGB."""
        image = Image.open(io.BytesIO(self.image_bytes(row)))
        image.load()
        if image.mode == "P" and "transparency" in image.info:
            # Avoids Pillow's palette-transparency warning; the alpha is dropped just below.
            image = image.convert("RGBA")
        return image.convert("RGB") if image.mode != "RGB" else image

    def captions(self, row: int) -> list[str]:
        _f, batch, j = self._locate(row)
        return batch["caption"][j].as_py()

    def image_id(self, row: int) -> str:
        """The image id as a string (integer ids, as some writers store them, in decimal)."""
        _f, batch, j = self._locate(row)
        return str(batch["image_id"][j].as_py())

    def split(self, row: int) -> str | None:
        f, batch, j = self._locate(row)
        return batch["split"][j].as_py() if f.has_split else None

    def text_ids(self, row: int) -> list[int] | None:
        """Our text id of each caption of ``row``; ``None`` for files without the column."""
        f, batch, j = self._locate(row)
        return batch[TEXT_IDS_COLUMN][j].as_py() if f.has_text_ids else None

    def row(self, row: int) -> ArrowRow:
        f, batch, j = self._locate(row)
        return ArrowRow(
            image=batch["image"][j].as_py(),
            captions=batch["caption"][j].as_py(),
            image_id=str(batch["image_id"][j].as_py()),
            split=batch["split"][j].as_py() if f.has_split else None,
            text_ids=batch[TEXT_IDS_COLUMN][j].as_py() if f.has_text_ids else None,
        )

    def image_ids(self) -> list[str]:
        """Every row's image id, as strings, in row order."""
        return [str(v) for _f, b in self._batches for v in b.column("image_id").to_pylist()]

    def __iter__(self) -> Iterator[ArrowRow]:
        for i in range(self._num_rows):
            yield self.row(i)

    # -- the flattened caption view

    @property
    def index_mapper(self) -> list[tuple[int, int]]:
        """ViLT's ``index_mapper`` as a list: position k -> (image index, caption index)."""
        return list(zip(self.image_index.tolist(), self.caption_index.tolist()))

    def pair(self, k: int) -> tuple[int, int]:
        """(image index, caption index) of caption ``k`` of the flattened view."""
        if not 0 <= k < len(self.image_index):
            raise IndexError(f"caption {k} out of range for {len(self.image_index)} captions")
        return int(self.image_index[k]), int(self.caption_index[k])

    def caption(self, k: int) -> str:
        """Caption ``k`` of the flattened view."""
        row, c = self.pair(k)
        _f, batch, j = self._locate(row)
        return batch["caption"][j].values[c].as_py()


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``python -m vlretrieval.data.arrow_store info PATH``: check an Arrow file and print its counts."""
    parser = argparse.ArgumentParser(prog="python -m vlretrieval.data.arrow_store", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="check an Arrow file (or a directory of them) and print its counts")
    info.add_argument("path", type=Path)
    info.add_argument("--check-images", action="store_true", help="also decode every image (slow)")
    info.add_argument("--allow-empty-captions", action="store_true")
    args = parser.parse_args(argv)
    try:
        with ArrowSplit(args.path, check_images=args.check_images,
                        allow_empty_captions=args.allow_empty_captions) as data:
            print(json.dumps({"path": str(data.path), "files": [str(p) for p in data.files], "images": data.num_images,
                              "captions": data.num_captions, "text_ids": data.has_text_ids}, indent=2))
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
