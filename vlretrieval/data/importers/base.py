"""What every source reader shares: the unvalidated record types, the split interface and the
helpers for locating, reading and naming records.
"""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ...errors import DataError

_INT_RE = re.compile(r"-?[0-9]+")


@dataclass(frozen=True)
class SourceImage:
    """One image record as found in a source, not yet validated.

    ``image_id`` is the id text exactly as found; ``payload`` is the base64 text, ``str`` or
    ``bytes`` (an images tsv's ASCII lines, LMDB values and encoded image files give bytes).
    """

    file: str
    line: int | None
    key: str | None
    image_id: str
    payload: str | bytes
    problem: str | None = None

    @property
    def location(self) -> str:
        return record_location(self.file, self.line, self.key)


@dataclass(frozen=True)
class SourceText:
    """One text record as found in a source, not yet validated.

    ``obj`` is the record in the texts-jsonl shape (``{"text_id", "text", "image_ids"}``) as far
    as the source could build it; it is ``None`` when nothing usable was found.
    """

    file: str
    line: int | None
    key: str | None
    obj: Any
    problem: str | None = None

    @property
    def location(self) -> str:
        return record_location(self.file, self.line, self.key)


def record_location(file: str, line: int | None, key: str | None) -> str:
    """``file:line`` for text files, ``lmdb_dir [key '12']`` for LMDB entries."""
    if line is not None:
        return f"{file}:{line}"
    if key is not None:
        return f"{file} [key {key!r}]"
    return file


class SourceSplit(abc.ABC):
    """One split of one source. Each ``iter_*`` call starts a fresh pass over the data.

    The validator reads the images twice (validate, then copy the kept ones), so a pass must be
    repeatable and must not hold all image bytes in memory.
    """

    fmt: str = ""

    def __init__(self, split: str, description: str):
        self.split = split
        self.description = description

    @property
    @abc.abstractmethod
    def images_file(self) -> str:
        """Where the images live, for messages such as "image id 7 does not exist in ..."."""

    @abc.abstractmethod
    def iter_images(self) -> Iterator[SourceImage]:
        ...

    @abc.abstractmethod
    def iter_texts(self) -> Iterator[SourceText]:
        ...

    @abc.abstractmethod
    def input_bytes(self) -> int:
        """Size of the source on disk, used to size the output LMDB up front."""

    def close(self) -> None:
        pass

    def __enter__(self) -> "SourceSplit":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description!r})"


def parse_int_id(text: str) -> int | None:
    """The integer an id field spells, or ``None``; only ASCII decimal digits with an optional sign."""
    text = text.strip()
    # str.isdigit() and int() also accept non-ASCII digits; ids end up in ASCII LMDB keys.
    if not _INT_RE.fullmatch(text) or len(text) > 20:
        return None
    return int(text)


class _FileSnapshot:
    """Detects a source file that changes between the passes of one import."""

    def __init__(self, path: Path):
        self.path = path
        self._stamp = self._read()

    def _read(self) -> tuple[int, int]:
        st = self.path.stat()
        return st.st_size, st.st_mtime_ns

    def check(self) -> None:
        if self._read() != self._stamp:
            raise DataError(str(self.path), "the file changed while it was being imported; run the import again")


def _require_file(path: Path, fmt: str) -> Path:
    if not path.is_file():
        raise DataError(str(path), f"file not found (format {fmt} expects it)")
    return path


def _utf8_error(path: Path, exc: UnicodeDecodeError) -> DataError:
    # Text files decode in chunks, so the exception does not say which line is bad; find it
    # with a binary rescan, which only ever runs on this error path.
    with open(path, "rb") as handle:
        for line_no, line in enumerate(handle, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as bad:
                return DataError(f"{path}:{line_no}", f"not valid UTF-8 ({bad.reason} at byte {bad.start} of the line)")
    return DataError(str(path), f"not valid UTF-8 ({exc.reason})")


_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "a boolean", type(None): "null"}


def _json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def clean_caption(text: str) -> str:
    """A caption as one line: ends stripped, each internal line break (with the blanks around it)
    turned into one space.

    The benchmark counts captions as lines of a flattened caption file, so a caption is one line
    by definition; a break inside one is an annotation artefact (AIC has a few), and every
    one-caption-per-line export downstream would otherwise split it in two and shift the ids.
    A space rather than nothing, because the break may separate words in Latin-script fragments.
    """
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def _plain_file_name(name: str) -> bool:
    # The name is joined to the image directory; anything that could leave it is refused.
    return bool(name) and name not in (".", "..") and not any(c in name for c in ("/", "\\", "\0"))
