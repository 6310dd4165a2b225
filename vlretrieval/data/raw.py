"""The raw dataset layout shared by Chinese-CLIP and PaddleNLP.

A split is two files:

* ``{split}_imgs.tsv``: one ``image_id<TAB>base64(image bytes)`` line per image, in the standard or
  the URL-safe alphabet (the reference readers' ``urlsafe_b64decode`` takes both), padded or not
  (:mod:`vlretrieval.data.base64_payload`); written here in the standard alphabet, padded;
* ``{split}_texts.jsonl``: one ``{"text_id": int, "text": str, "image_ids": [int, ...]}`` line per text.

Reading here is lexical only: it yields fields with their line numbers and leaves judging them
to :mod:`vlretrieval.data.validation`, so every problem is reported with its file and line.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterable, Iterator

SPLITS = ("train", "valid", "test")


def images_tsv_path(root: str | os.PathLike, split: str) -> Path:
    return Path(root) / f"{split}_imgs.tsv"


def texts_jsonl_path(root: str | os.PathLike, split: str) -> Path:
    return Path(root) / f"{split}_texts.jsonl"


@dataclass(frozen=True)
class RawImageLine:
    """One line of an images tsv, not yet validated."""

    path: str
    line_no: int
    image_id: str
    payload: str | bytes  # base64 text as found in the file (bytes where the line is ASCII)


@dataclass(frozen=True)
class RawTextLine:
    """One line of a texts jsonl, parsed as JSON when possible, not yet validated."""

    path: str
    line_no: int
    raw: str
    obj: object = field(default=None)
    json_error: str | None = None


# ASCII characters that str.strip() removes (bytes.strip() alone keeps \x1c-\x1f).
_ASCII_SPACE = bytes(c for c in range(128) if chr(c).isspace())
# An images tsv line is an image's base64, ~100 kB: reads of up to this many bytes take one in a
# few calls, and bound what is read at once where lines end in CR alone (which readline does not see).
_IMAGE_LINES_READ = 1 << 20


def iter_image_lines(path: str | os.PathLike) -> Iterator[RawImageLine]:
    """Yield every non-empty line of an images tsv; a line without a tab keeps an empty payload.

    The file is read as bytes, 4-5x faster than as text on lines this long, and an ASCII line's
    payload stays bytes. Lines split where text mode (``newline=""``) splits them, at ``\n``,
    ``\r`` and ``\r\n``, and a line with a non-ASCII byte is decoded as UTF-8 (raising
    ``UnicodeDecodeError`` where it is not), so line numbers and fields are those of the text.
    """
    path = str(path)
    with open(path, "rb", buffering=_IMAGE_LINES_READ) as handle:
        for line_no, line in enumerate(_text_mode_lines(handle), start=1):
            if not line.isascii():
                text = line.decode("utf-8")
                if text.strip():
                    image_id, sep, payload = text.partition("\t")
                    yield RawImageLine(path, line_no, image_id.strip(), payload.strip() if sep else "")
            elif line.strip(_ASCII_SPACE):
                image_id, sep, payload = line.partition(b"\t")
                yield RawImageLine(path, line_no, image_id.strip(_ASCII_SPACE).decode("ascii"),
                                   payload.strip(_ASCII_SPACE) if sep else b"")


def _text_mode_lines(handle: IO[bytes]) -> Iterator[bytes]:
    """The lines of a binary file, without their ends, split at ``\n``, ``\r`` and ``\r\n`` as text
    mode with ``newline=""`` splits them, reading at most :data:`_IMAGE_LINES_READ` bytes at once."""
    unfinished = b""
    for read in iter(lambda: handle.readline(_IMAGE_LINES_READ), b""):
        if not unfinished and read.endswith(b"\n") and b"\r" not in read:
            yield read[:-1]  # the usual case: one whole line
            continue
        data = unfinished + read if unfinished else read
        lines = data.splitlines()
        if data.endswith(b"\r"):
            unfinished = lines.pop() + b"\r"  # the CR may be the first half of a CRLF
        elif data.endswith(b"\n"):
            unfinished = b""
        else:
            unfinished = lines.pop()
        yield from lines
    if unfinished:
        yield from unfinished.splitlines()


def iter_text_lines(path: str | os.PathLike) -> Iterator[RawTextLine]:
    """Yield every non-empty line of a texts jsonl with its parsed JSON (or the parse error)."""
    path = str(path)
    with open(path, "r", encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield RawTextLine(path, line_no, line, json.loads(line))
            except json.JSONDecodeError as exc:
                yield RawTextLine(path, line_no, line, None, f"invalid JSON: {exc.msg}, column {exc.colno}")


def write_image_line(handle: IO[str], image_id: int, image_bytes: bytes) -> None:
    handle.write(f"{int(image_id)}\t{base64.b64encode(image_bytes).decode('ascii')}\n")


def write_text_line(handle: IO[str], text_id: int, text: str, image_ids: Iterable[int]) -> None:
    record = {"text_id": int(text_id), "text": text, "image_ids": [int(i) for i in image_ids]}
    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
