"""Reader for ``coco_cn_data``: one file per split, ``text<TAB>image_id<TAB>base64`` per caption."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..base64_payload import Base64PayloadError, decode_base64_payload
from .base import SourceImage, SourceSplit, SourceText, _FileSnapshot, _require_file, _utf8_error, parse_int_id


def _payload_digest(payload: str | bytes) -> bytes:
    # Compare decoded bytes so two spellings of the same image (the standard and the URL-safe
    # alphabet, padded or not, different unused bits in the last symbol) agree; undecodable
    # payloads fall back to their text and are reported by the validator anyway.
    try:
        data = decode_base64_payload(payload)
    except Base64PayloadError:
        data = payload.encode("utf-8", "surrogatepass") if isinstance(payload, str) else payload
    return hashlib.blake2b(data, digest_size=16).digest()


@dataclass
class _CocoLine:
    line_no: int
    text_id: int
    text: str | None
    image_id: str | None
    problem: str | None


class CocoCnSplit(SourceSplit):
    """A COCO-CN ``.data`` file: one caption per line, its image repeated on every caption line.

    Text ids are the 0-based index of the caption among the file's non-empty lines. An image id
    is emitted once, from its first line; a later line with the same id but different bytes is
    reported as a bad image, and its caption as a bad text (it describes bytes that are not kept).
    """

    fmt = "coco_cn_data"

    def __init__(self, path: Path, split: str):
        self.path = _require_file(path, self.fmt)
        self._snapshot = _FileSnapshot(self.path)
        self._lines: list[_CocoLine] | None = None
        self._first_line: dict[int | str, int] = {}
        self._conflicts: dict[int, int] = {}  # line_no -> line of the first occurrence
        super().__init__(split, f"coco_cn_data {split} split in {path}")

    @property
    def images_file(self) -> str:
        return str(self.path)

    def _iter_fields(self) -> Iterator[tuple[int, list[str] | None, str | None]]:
        self._snapshot.check()
        with open(self.path, "r", encoding="utf-8", newline="") as handle:
            try:
                for line_no, line in enumerate(handle, start=1):
                    line = line.rstrip("\r\n")
                    if not line.strip():
                        continue
                    # Captions may contain tabs; the id and the base64 never do, so split from the right.
                    fields = line.rsplit("\t", 2)
                    if len(fields) != 3:
                        yield line_no, None, (
                            f"expected 3 tab-separated fields (text, image id, base64), found {len(fields)}"
                        )
                    else:
                        yield line_no, fields, None
            except UnicodeDecodeError as exc:
                raise _utf8_error(self.path, exc) from None

    @staticmethod
    def _id_key(image_id: str) -> int | str:
        parsed = parse_int_id(image_id)
        return image_id.strip() if parsed is None else parsed

    def _scan(self) -> list[_CocoLine]:
        if self._lines is not None:
            return self._lines
        lines: list[_CocoLine] = []
        digests: dict[int | str, bytes] = {}
        for text_id, (line_no, fields, problem) in enumerate(self._iter_fields()):
            if fields is None:
                lines.append(_CocoLine(line_no, text_id, None, None, problem))
                continue
            text, image_id, payload = fields[0], fields[1].strip(), fields[2].strip()
            key = self._id_key(image_id)
            digest = _payload_digest(payload)
            if key not in digests:
                digests[key] = digest
                self._first_line[key] = line_no
            elif digests[key] != digest:
                self._conflicts[line_no] = self._first_line[key]
                problem = (
                    f"its image {image_id} has different bytes here than at line {self._first_line[key]}, "
                    "so this caption does not describe the kept image"
                )
            if problem is None and parse_int_id(image_id) is None:
                problem = f"its image id {image_id!r} is not an integer"
            lines.append(_CocoLine(line_no, text_id, text, image_id, problem))
        self._lines = lines
        return lines

    def iter_images(self) -> Iterator[SourceImage]:
        self._scan()
        for line_no, fields, _problem in self._iter_fields():
            if fields is None:
                continue  # reported once, as a text record
            image_id, payload = fields[1].strip(), fields[2].strip()
            first = self._first_line.get(self._id_key(image_id))
            if line_no == first:
                yield SourceImage(str(self.path), line_no, None, image_id, payload)
            elif line_no in self._conflicts:
                yield SourceImage(
                    str(self.path), line_no, None, image_id, payload,
                    f"image id {image_id} appears again with different bytes "
                    f"(first at line {self._conflicts[line_no]})",
                )

    def iter_texts(self) -> Iterator[SourceText]:
        for entry in self._scan():
            obj = None
            if entry.text is not None:
                image_id = parse_int_id(entry.image_id or "")
                obj = {"text_id": entry.text_id, "text": entry.text,
                       "image_ids": [image_id if image_id is not None else entry.image_id]}
            yield SourceText(str(self.path), entry.line_no, None, obj, entry.problem)

    def input_bytes(self) -> int:
        # Every image is repeated once per caption; the deduplicated output is several times smaller,
        # and the writer grows its map if this guess is short.
        return self.path.stat().st_size
