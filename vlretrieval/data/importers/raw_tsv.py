"""Reader for ``raw_tsv``: ``{root}/{split}_imgs.tsv`` + ``{root}/{split}_texts.jsonl``.

The line formats themselves are read by :mod:`vlretrieval.data.raw`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from .. import raw
from .base import SourceImage, SourceSplit, SourceText, _FileSnapshot, _require_file, _utf8_error


def _utf8_guard(path: Path, records: Iterator[Any]) -> Iterator[Any]:
    # raw.py decodes the files as UTF-8 (the images tsv only where a line is not ASCII); a decode
    # failure is a file-level defect (the line cannot be read at all), so it is raised under every
    # policy with its line number.
    try:
        yield from records
    except UnicodeDecodeError as exc:
        raise _utf8_error(path, exc) from None


class RawTsvSplit(SourceSplit):
    fmt = "raw_tsv"

    def __init__(self, root: Path, split: str):
        self.images_path = _require_file(raw.images_tsv_path(root, split), self.fmt)
        self.texts_path = _require_file(raw.texts_jsonl_path(root, split), self.fmt)
        self._snapshots = [_FileSnapshot(self.images_path), _FileSnapshot(self.texts_path)]
        super().__init__(split, f"raw_tsv {split} split in {root}")

    @property
    def images_file(self) -> str:
        return str(self.images_path)

    def iter_images(self) -> Iterator[SourceImage]:
        self._snapshots[0].check()
        for line in _utf8_guard(self.images_path, raw.iter_image_lines(self.images_path)):
            problem = None if line.payload else "no base64 payload after the image id (expected 'id<TAB>base64')"
            yield SourceImage(line.path, line.line_no, None, line.image_id, line.payload, problem)

    def iter_texts(self) -> Iterator[SourceText]:
        self._snapshots[1].check()
        for line in _utf8_guard(self.texts_path, raw.iter_text_lines(self.texts_path)):
            yield SourceText(line.path, line.line_no, None, line.obj, line.json_error)

    def input_bytes(self) -> int:
        return self.images_path.stat().st_size + self.texts_path.stat().st_size
