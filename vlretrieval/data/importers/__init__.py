"""Source readers: one per on-disk dataset format, all producing the same raw record streams.

A reader only finds records and says where each one lives (file and line, or LMDB and key).
Judging them is left to :mod:`vlretrieval.data.validation`, so every format gets the same
checks, the same messages and the same bad-record policy. A reader sets ``problem`` on a
record only for defects that it alone can see (a COCO-CN line without three fields, a pickle
of the wrong shape); the validator then treats that record like any other bad one.

Formats (``SOURCE_FORMATS``), one module each; :mod:`.base` holds the record types and helpers
they share:

* ``raw_tsv``: ``{root}/{split}_imgs.tsv`` + ``{root}/{split}_texts.jsonl`` (see :mod:`vlretrieval.data.raw`);
* ``coco_cn_data``: one file per split, ``text<TAB>image_id<TAB>base64`` per caption, images
  repeated once per caption;
* ``reference_lmdb``: ``{root}/lmdb/{split}/imgs`` and ``pairs`` as written by Chinese-CLIP's
  ``build_lmdb_dataset.py`` (base64 image values, pickled ``(image_id, text_id, text)`` pairs).
  Pickles are read with an unpickler that cannot reach any global, so no code in the data runs;
* ``aic_icc``: the AI Challenger image caption release, a JSON list of
  ``{"url", "image_id": "<name>.jpg", "caption": [...]}`` annotations (``split_files``) and a
  directory of image files (``image_dirs``), cut to the first ``max_lines`` caption lines;
* ``karpathy_json``: Karpathy's ``dataset_coco.json`` / ``dataset_flickr30k.json`` (``split_files``)
  with the images as files under ``root`` at ``{filepath}/{filename}`` (COCO's ``train2014/`` and
  ``val2014/`` zips extracted there) or ``{image_dirs[split]}/{filename}``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from ...errors import ConfigError
from .aic_icc import AicIccSplit, _max_lines
from .base import (
    SourceImage,
    SourceSplit,
    SourceText,
    clean_caption,
    parse_int_id,
    record_location,
)
from .coco_cn_data import CocoCnSplit
from .karpathy_json import KARPATHY_SPLITS, KarpathyJsonSplit
from .raw_tsv import RawTsvSplit
from .reference_lmdb import ForbiddenPickleError, ReferenceLmdbSplit, load_reference_pair

__all__ = [
    "KARPATHY_SPLITS",
    "SOURCE_FORMATS",
    "AicIccSplit",
    "CocoCnSplit",
    "ForbiddenPickleError",
    "KarpathyJsonSplit",
    "RawTsvSplit",
    "ReferenceLmdbSplit",
    "SourceImage",
    "SourceSplit",
    "SourceText",
    "clean_caption",
    "load_reference_pair",
    "parse_int_id",
    "read_source",
    "record_location",
]

SOURCE_FORMATS = ("raw_tsv", "coco_cn_data", "reference_lmdb", "aic_icc", "karpathy_json")


def _split_name(split: str) -> str:
    if not split or os.sep in split or "/" in split or split in (".", ".."):
        raise ConfigError(f"invalid split name {split!r}")
    return split


def read_source(fmt: str, source_dir: Path, split: str, entry: Mapping[str, Any]) -> SourceSplit:
    """Open one split of a downloaded dataset for validation.

    ``entry`` is the dataset's registry entry (``config/datasets.yaml``): ``root`` (default
    ``.``) locates every format's data under ``source_dir``; ``split_files[split]`` names the
    ``coco_cn_data`` file and the ``aic_icc`` annotations JSON, ``image_dirs[split]`` the
    ``aic_icc`` image directory, both relative to ``root``; ``aic_icc`` keeps only the first
    ``max_lines`` caption lines (absent or null: all); ``karpathy_json`` reads
    ``split_files[split]`` and finds images under ``root`` by their ``filepath``, or directly in
    ``image_dirs[split]`` when that is given. The result is a context manager.
    """
    if fmt not in SOURCE_FORMATS:
        raise ConfigError(f"unknown source format {fmt!r}; known formats: {', '.join(SOURCE_FORMATS)}")
    split = _split_name(split)
    source_dir = Path(source_dir)
    root = source_dir / str(entry.get("root") or ".")
    if fmt == "raw_tsv":
        return RawTsvSplit(root, split)
    if fmt == "coco_cn_data":
        split_files = entry.get("split_files") or {}
        if split not in split_files:
            raise ConfigError(f"format coco_cn_data needs split_files.{split} in the dataset entry")
        return CocoCnSplit(root / split_files[split], split)
    if fmt == "aic_icc":
        split_files = entry.get("split_files") or {}
        image_dirs = entry.get("image_dirs") or {}
        for key, table in (("split_files", split_files), ("image_dirs", image_dirs)):
            if split not in table:
                raise ConfigError(f"format aic_icc needs {key}.{split} in the dataset entry")
        return AicIccSplit(root / split_files[split], root / image_dirs[split], split, _max_lines(entry))
    if fmt == "karpathy_json":
        split_files = entry.get("split_files") or {}
        if split not in split_files:
            raise ConfigError(f"format karpathy_json needs split_files.{split} in the dataset entry")
        image_dirs = entry.get("image_dirs") or {}
        image_root = root / image_dirs[split] if split in image_dirs else root
        return KarpathyJsonSplit(root / split_files[split], image_root, split, split in image_dirs)
    return ReferenceLmdbSplit(root / "lmdb" / split, split)
