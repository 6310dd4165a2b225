"""Reading a ``text,url,filename`` CSV into rows, each with its line and any defect of its own."""

from __future__ import annotations

import csv
import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ...errors import DataError
from ..importers.base import _plain_file_name, _utf8_error, clean_caption

CSV_COLUMNS = ("text", "url", "filename")
# A filesystem limit; names beyond it could never be written to the cache.
_MAX_NAME_BYTES = 255


@dataclass(frozen=True)
class CsvRow:
    """One data row of the CSV; ``problem`` is set when the row itself is unusable."""

    index: int  # 0-based among data rows, which makes it the text id
    line: int  # 1-based line where the row starts (a quoted text may span lines)
    text: str | None
    url: str | None
    filename: str | None
    problem: str | None = None


def _header_columns(path: Path, header: list[str]) -> dict[str, int]:
    names = [name.strip().lower() for name in header]
    duplicated = sorted({name for name in names if name and names.count(name) > 1})
    if duplicated:
        raise DataError(f"{path}:1", f"header names the column(s) {', '.join(duplicated)} more than once")
    missing = [name for name in CSV_COLUMNS if name not in names]
    if missing:
        shown = ",".join(header)[:200]
        raise DataError(
            f"{path}:1",
            f"header must name the columns {','.join(CSV_COLUMNS)} (missing {', '.join(missing)}); found {shown!r}",
        )
    return {name: names.index(name) for name in CSV_COLUMNS}


def _row_problem(text: str, url: str, filename: str) -> str | None:
    if not text:
        return "text is empty"
    if not url:
        return "url is empty"
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        return f"url {url[:200]!r} is not an http(s) URL"
    if not filename:
        return "filename is empty"
    if not _plain_file_name(filename) or filename.startswith("."):
        return f"filename {filename[:200]!r} is not a plain file name (no path separators, no leading dot)"
    if len(filename.encode("utf-8")) > _MAX_NAME_BYTES:
        return f"filename is longer than {_MAX_NAME_BYTES} bytes"
    return None


def read_csv_rows(path: str | os.PathLike) -> Iterator[CsvRow]:
    """Yield the data rows of a ``text,url,filename`` CSV, each with its line and any defect.

    The header must name the three columns (any order, case and surrounding blanks ignored;
    other columns are ignored). Blank lines are skipped. Texts are cleaned like every other
    caption (:func:`~vlretrieval.data.importers.clean_caption`). Defects a row can have alone
    (wrong number of fields, empty text, a non-http(s) URL, a file name with a path in it) are
    set as ``problem``; a file that cannot be read as CSV at all raises :class:`DataError`.
    """
    path = Path(path)
    try:
        handle = open(path, "r", encoding="utf-8-sig", newline="")
    except FileNotFoundError:
        raise DataError(str(path), "CSV file not found (format url_csv expects it)") from None
    except OSError as exc:
        raise DataError(str(path), f"cannot read the CSV ({exc.strerror or exc})") from None
    with handle:
        # strict: a stray quote that would swallow the following lines into one text is an error.
        reader = csv.reader(handle, strict=True)
        try:
            try:
                header = next(reader)
            except StopIteration:
                raise DataError(str(path), f"the CSV is empty; expected the header {','.join(CSV_COLUMNS)}") from None
            columns = _header_columns(path, header)
            width = len(header)
            index = 0
            while True:
                line = reader.line_num + 1
                try:
                    fields = next(reader)
                except StopIteration:
                    return
                except csv.Error as exc:
                    raise DataError(f"{path}:{reader.line_num}", f"not readable as CSV ({exc})") from None
                if not fields or (len(fields) == 1 and not fields[0].strip()):
                    continue
                if len(fields) != width:
                    yield CsvRow(index, line, None, None, None,
                                 f"expected {width} fields like the header, found {len(fields)}")
                else:
                    text = clean_caption(fields[columns["text"]])
                    url = fields[columns["url"]].strip()
                    filename = fields[columns["filename"]].strip()
                    yield CsvRow(index, line, text, url, filename, _row_problem(text, url, filename))
                index += 1
        except UnicodeDecodeError as exc:
            raise _utf8_error(path, exc) from None
