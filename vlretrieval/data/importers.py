"""Source readers: one per on-disk dataset format, all producing the same raw record streams.

A reader only finds records and says where each one lives (file and line, or LMDB and key).
Judging them is left to :mod:`vlretrieval.data.validation`, so every format gets the same
checks, the same messages and the same bad-record policy. A reader sets ``problem`` on a
record only for defects that it alone can see (a COCO-CN line without three fields, a pickle
of the wrong shape); the validator then treats that record like any other bad one.

Formats (``SOURCE_FORMATS``):

* ``raw_tsv``: ``{root}/{split}_imgs.tsv`` + ``{root}/{split}_texts.jsonl`` (see :mod:`.raw`);
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

import abc
import binascii
import hashlib
import io
import json
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import lmdb

from ..errors import ConfigError, DataError
from . import raw

SOURCE_FORMATS = ("raw_tsv", "coco_cn_data", "reference_lmdb", "aic_icc", "karpathy_json")

_INT_RE = re.compile(r"-?[0-9]+")


@dataclass(frozen=True)
class SourceImage:
    """One image record as found in a source, not yet validated.

    ``image_id`` is the id text exactly as found; ``payload`` is the base64 text (``str`` from
    text files, ``bytes`` from an LMDB).
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


# --------------------------------------------------------------------------------------------
# raw_tsv


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


def _utf8_guard(path: Path, records: Iterator[Any]) -> Iterator[Any]:
    # raw.py decodes whole files as UTF-8; a decode failure is a file-level defect (the
    # line cannot be read at all), so it is raised under every policy with its line number.
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


# --------------------------------------------------------------------------------------------
# coco_cn_data


def _payload_digest(payload: str | bytes) -> bytes:
    # Compare decoded bytes so two spellings of the same image (e.g. different unused bits in the
    # last symbol) agree; undecodable payloads fall back to their text and are reported by the
    # validator anyway.
    try:
        data = binascii.a2b_base64(payload)
    except (binascii.Error, ValueError):
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


# --------------------------------------------------------------------------------------------
# reference_lmdb


class ForbiddenPickleError(pickle.UnpicklingError):
    """The pickle asks for a global (a class or function), which could run code when loaded."""


class _PlainDataUnpickler(pickle.Unpickler):
    # Every route to code execution in a pickle (REDUCE, BUILD, NEWOBJ, INST, OBJ, EXT*) needs a
    # callable or a class, and the only way to obtain one is through find_class. Refusing every
    # global therefore limits the result to what opcodes build directly: ints, floats, strings,
    # bytes, tuples, lists, dicts, sets, None and booleans.
    def find_class(self, module: str, name: str) -> Any:
        raise ForbiddenPickleError(f"the pickle references the global {module}.{name}; only plain data is accepted")

    def persistent_load(self, pid: Any) -> Any:
        raise ForbiddenPickleError("the pickle uses a persistent id; only plain data is accepted")


def _type_name(value: Any) -> str:
    return type(value).__name__


def load_reference_pair(data: bytes) -> tuple[int, int, str]:
    """Decode one reference ``pairs`` value: a pickled ``(image_id, text_id, text)`` tuple.

    Raises :class:`ForbiddenPickleError` when the pickle reaches for any global (nothing in it is
    executed) and :class:`ValueError` for anything that is not exactly ``(int, int, str)``.
    """
    stream = io.BytesIO(data)
    try:
        obj = _PlainDataUnpickler(stream).load()
    except ForbiddenPickleError:
        raise
    except Exception as exc:  # a corrupt pickle can raise almost anything; report it uniformly
        raise ValueError(f"not a readable pickle: {type(exc).__name__}: {exc}") from None
    if stream.tell() != len(data):
        raise ValueError(f"{len(data) - stream.tell()} unexpected bytes after the pickle")
    if type(obj) is not tuple:
        raise ValueError(f"expected a pickled (image_id, text_id, text) tuple, found a {_type_name(obj)}")
    if len(obj) != 3:
        raise ValueError(f"expected a pickled (image_id, text_id, text) tuple, found a tuple of {len(obj)} items")
    image_id, text_id, text = obj
    # bool is an int subclass and would pass isinstance; a True id is corruption, not 1.
    if type(image_id) is not int or type(text_id) is not int or type(text) is not str:
        found = ", ".join(_type_name(v) for v in obj)
        raise ValueError(f"expected (int, int, str) for (image_id, text_id, text), found ({found})")
    return image_id, text_id, text


def _open_lmdb_readonly(path: Path) -> lmdb.Environment:
    if not (path / "data.mdb").is_file():
        raise DataError(str(path), "not an LMDB environment (no data.mdb); expected the reference layout "
                                   "lmdb/{split}/imgs and lmdb/{split}/pairs")
    try:
        return lmdb.open(str(path), readonly=True, lock=False, readahead=False, subdir=True, max_readers=126)
    except lmdb.Error as exc:
        raise DataError(str(path), f"cannot open the LMDB: {exc}") from None


def _read_count(env: lmdb.Environment, path: Path, key: bytes) -> int:
    with env.begin() as txn:
        value = txn.get(key)
    if value is None:
        raise DataError(str(path), f"missing the {key.decode()!r} entry of the reference layout")
    try:
        count = parse_int_id(value.decode("ascii"))
    except UnicodeDecodeError:
        count = None
    if count is None or count < 0:
        raise DataError(str(path), f"the {key.decode()!r} entry is not a count: {value[:40]!r}")
    return count


def _key_text(key: bytes) -> str:
    return key.decode("utf-8", "backslashreplace")


class ReferenceLmdbSplit(SourceSplit):
    """A split serialized by the reference tools: ``imgs/`` and ``pairs/`` LMDB environments.

    The entry counts must match ``num_images`` / ``num_samples``: the reference builder counts
    lines, so a mismatch means a truncated copy or an images file with repeated ids whose
    earlier bytes were silently overwritten. That is refused under every policy, because the
    lost records can no longer be named.

    Consecutive pairs with the same ``(text_id, text)`` form one text, which is how the
    reference builder writes a text naming several images.
    """

    fmt = "reference_lmdb"

    def __init__(self, lmdb_dir: Path, split: str):
        self.lmdb_dir = lmdb_dir
        self.images_path = lmdb_dir / "imgs"
        self.pairs_path = lmdb_dir / "pairs"
        super().__init__(split, f"reference_lmdb {split} split in {lmdb_dir}")
        self._imgs = _open_lmdb_readonly(self.images_path)
        try:
            self._pairs = _open_lmdb_readonly(self.pairs_path)
        except BaseException:
            self._imgs.close()
            raise
        try:
            self.num_images = _read_count(self._imgs, self.images_path, b"num_images")
            self.num_samples = _read_count(self._pairs, self.pairs_path, b"num_samples")
            self._check_entries(self._imgs, self.images_path, self.num_images, "num_images")
            self._check_entries(self._pairs, self.pairs_path, self.num_samples, "num_samples")
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _check_entries(env: lmdb.Environment, path: Path, expected: int, key: str) -> None:
        entries = env.stat()["entries"] - 1  # the count entry itself
        if entries != expected:
            raise DataError(
                str(path),
                f"{key} says {expected} but the LMDB holds {entries} records; it is truncated or was built "
                "from a file with repeated ids (the reference builder overwrites them), so it cannot be "
                "imported faithfully",
            )

    @property
    def images_file(self) -> str:
        return str(self.images_path)

    def iter_images(self) -> Iterator[SourceImage]:
        with self._imgs.begin() as txn:
            keys = [key for key in txn.cursor().iternext(keys=True, values=False) if key != b"num_images"]

            # LMDB orders keys as bytes ("10" < "9"); numeric order matches the source tsv far more often.
            def order(key: bytes) -> tuple[int, int, bytes]:
                parsed = parse_int_id(key.decode("ascii", "replace"))
                return (0, parsed, key) if parsed is not None else (1, 0, key)

            keys.sort(key=order)
            file = str(self.images_path)
            for key in keys:
                value = txn.get(key)
                yield SourceImage(file, None, _key_text(key), _key_text(key), bytes(value))

    def iter_texts(self) -> Iterator[SourceText]:
        file = str(self.pairs_path)
        group: dict[str, Any] | None = None

        def flush() -> SourceText:
            first, last = group["keys"]
            key = first if first == last else f"{first}..{last}"
            obj = {"text_id": group["text_id"], "text": group["text"], "image_ids": group["image_ids"]}
            return SourceText(file, None, key, obj)

        with self._pairs.begin() as txn:
            for index in range(self.num_samples):
                key = str(index)
                value = txn.get(key.encode("ascii"))
                if value is None:
                    raise DataError(record_location(file, None, key),
                                    f"pair key missing although num_samples is {self.num_samples}")
                try:
                    image_id, text_id, text = load_reference_pair(bytes(value))
                except ForbiddenPickleError as exc:
                    # Not a bad record but a hostile or foreign file: refused whatever the policy.
                    raise DataError(record_location(file, None, key), f"refusing to unpickle: {exc}") from None
                except ValueError as exc:
                    if group is not None:
                        yield flush()
                        group = None
                    yield SourceText(file, None, key, None, str(exc))
                    continue
                if group is not None and group["text_id"] == text_id and group["text"] == text:
                    group["image_ids"].append(image_id)
                    group["keys"][1] = key
                    continue
                if group is not None:
                    yield flush()
                group = {"text_id": text_id, "text": text, "image_ids": [image_id], "keys": [key, key]}
            if group is not None:
                yield flush()

    def input_bytes(self) -> int:
        return sum((p / "data.mdb").stat().st_size for p in (self.images_path, self.pairs_path))

    def close(self) -> None:
        for name in ("_imgs", "_pairs"):
            env = self.__dict__.pop(name, None)
            if env is not None:
                env.close()


# --------------------------------------------------------------------------------------------
# aic_icc

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


@dataclass(frozen=True)
class _AicLine:
    key: str  # "annotation 17, caption 3", or "annotation 17" for an annotation without captions
    text_id: int | None
    text: Any
    image_id: int | None
    problem: str | None


@dataclass(frozen=True)
class _AicImage:
    image_id: int
    name: str
    annotation: int  # the first annotation that names the file


def _annotation_fields(annotation: Any) -> tuple[str | None, str | None, list | None]:
    """``(problem, image file name, captions)`` of one annotation.

    ``captions`` is ``None`` only when the annotation has no usable caption list; then it adds
    no caption lines, because how many it should have added cannot be known.
    """
    if not isinstance(annotation, dict):
        return f"annotation is {_json_type(annotation)}, not an object with image_id and caption", None, None
    missing = [key for key in ("image_id", "caption") if key not in annotation]
    captions = annotation.get("caption")
    if "caption" in missing:
        return f"annotation lacks the key{'s' if len(missing) > 1 else ''} {', '.join(missing)}", None, None
    if not isinstance(captions, list):
        return f"caption is {_json_type(captions)}, not an array of captions", None, None
    if not captions:
        return "caption is an empty array", None, None
    if missing:
        return "annotation lacks the key image_id", None, captions
    name = annotation["image_id"]
    if not isinstance(name, str):
        return f"image_id is {_json_type(name)}, not a file name", None, captions
    if not _plain_file_name(name):
        return f"image_id {name[:80]!r} is not a plain file name in the image directory", None, captions
    return None, name, captions


class AicIccSplit(SourceSplit):
    """One split of the AI Challenger image caption release: annotations JSON + image directory.

    The annotations are flattened in file order into caption lines (annotation 0 captions 0..4,
    annotation 1 captions 0..4, ...) and only the first ``max_lines`` lines are kept, which is
    how ERNIE-ViL 2.0 defines its zero-shot split ("the first 10,000 lines of the validation
    set"). Text ids are the 0-based line index; image ids are 0-based in order of the first
    kept line naming the file. Records keep the source names for messages: images are located
    by their file path, texts by ``annotation N, caption M`` (0-based list positions) in the
    JSON. An annotation without a usable caption list adds no line and is reported as one bad
    text record. Images are read from disk one at a time, on each pass.
    """

    fmt = "aic_icc"

    def __init__(self, annotations_path: Path, image_dir: Path, split: str, max_lines: int | None):
        self.path = _require_file(annotations_path, self.fmt)
        if not image_dir.is_dir():
            raise DataError(str(image_dir), f"image directory not found (format {self.fmt} expects it)")
        self.image_dir = image_dir
        self.max_lines = max_lines
        self._snapshot = _FileSnapshot(self.path)
        self._scanned: tuple[list[_AicLine], list[_AicImage]] | None = None
        cut = "all caption lines" if max_lines is None else f"first {max_lines} caption lines"
        super().__init__(split, f"aic_icc {split} split in {annotations_path} + {image_dir} ({cut})")

    @property
    def images_file(self) -> str:
        return str(self.image_dir)

    def _load(self) -> list[Any]:
        data = self.path.read_bytes()
        try:
            # utf-8-sig: a BOM is the one harmless difference a re-saved copy of the file may have.
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise DataError(str(self.path), f"not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
        try:
            annotations = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(str(self.path), f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") \
                from None
        except RecursionError:
            raise DataError(str(self.path), "not readable JSON (nested too deeply)") from None
        if not isinstance(annotations, list):
            raise DataError(str(self.path), f"expected a JSON array of annotations, found {_json_type(annotations)}")
        return annotations

    def _scan(self) -> tuple[list[_AicLine], list[_AicImage]]:
        self._snapshot.check()
        if self._scanned is not None:
            return self._scanned
        lines: list[_AicLine] = []
        images: dict[str, _AicImage] = {}
        next_text_id = 0

        def full() -> bool:
            return self.max_lines is not None and next_text_id >= self.max_lines

        for index, annotation in enumerate(self._load()):
            if full():
                break
            problem, name, captions = _annotation_fields(annotation)
            if captions is None:
                lines.append(_AicLine(f"annotation {index}", None, None, None, problem))
                continue
            for caption_index, caption in enumerate(captions):
                if full():
                    break
                image_id = None
                if name is not None:
                    if name not in images:
                        images[name] = _AicImage(len(images), name, index)
                    image_id = images[name].image_id
                line_problem = problem
                text = caption
                if line_problem is None:
                    if not isinstance(caption, str):
                        line_problem = f"caption is {_json_type(caption)}, not a string"
                    else:
                        text = clean_caption(caption)
                        if not text:
                            line_problem = "caption is empty"
                lines.append(_AicLine(f"annotation {index}, caption {caption_index}", next_text_id, text, image_id,
                                      line_problem))
                next_text_id += 1
        self._scanned = (lines, list(images.values()))
        return self._scanned

    def iter_images(self) -> Iterator[SourceImage]:
        _lines, images = self._scan()
        for image in images:
            path = self.image_dir / image.name
            payload: bytes = b""
            problem = None
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                problem = f"image file not found (named by annotation {image.annotation} of {self.path.name})"
            except OSError as exc:
                problem = f"cannot read the image file ({exc.strerror or exc})"
            else:
                if not data:
                    problem = "image file is empty"
                else:
                    # The validator takes every format's images as base64 (the text formats store
                    # them so); encoding here keeps a single validation path for one image's bytes.
                    payload = binascii.b2a_base64(data, newline=False)
            yield SourceImage(str(path), None, None, str(image.image_id), payload, problem)

    def iter_texts(self) -> Iterator[SourceText]:
        lines, _images = self._scan()
        file = str(self.path)
        for line in lines:
            obj = None
            if line.text_id is not None:
                obj = {"text_id": line.text_id, "text": line.text}
                if line.image_id is not None:
                    obj["image_ids"] = [line.image_id]
            yield SourceText(file, None, line.key, obj, line.problem)

    def input_bytes(self) -> int:
        _lines, images = self._scan()
        total = self.path.stat().st_size
        for image in images:
            try:
                # The output stores each file's bytes unchanged, so their sizes are the estimate.
                total += (self.image_dir / image.name).stat().st_size
            except OSError:
                pass  # reported as a bad image by iter_images
        return total


# --------------------------------------------------------------------------------------------
# karpathy_json

# The Karpathy splits as the retrieval papers use them: "restval" (the rest of COCO val2014) is
# training data, which gives COCO's 113,287 / 5,000 / 5,000 images.
KARPATHY_SPLITS: dict[str, tuple[str, ...]] = {"train": ("train", "restval"), "valid": ("val",), "test": ("test",)}


@dataclass(frozen=True)
class _KarpathyImage:
    index: int  # position in the JSON's images list
    image_id: int | None
    path: Path | None
    texts: list[tuple[str, Any, str | None]]  # (key, texts-jsonl object or None, problem)
    problem: str | None


class KarpathyJsonSplit(SourceSplit):
    """One split of a Karpathy caption JSON (``{"images": [{"split", "filepath", "filename", "cocoid" |
    "imgid", "sentences": [{"raw", "sentid"}]}]}``) with the image files on disk.

    Image ids are ``cocoid`` when present (the COCO image id, which is how VinVL's features are
    keyed), else ``imgid``; text ids are ``sentid``. The split's images are those whose ``split``
    is one of ``KARPATHY_SPLITS[split]``, in file order. Records are located as ``images[N]`` and
    ``images[N].sentences[M]`` of the JSON.
    """

    fmt = "karpathy_json"

    def __init__(self, annotations_path: Path, image_root: Path, split: str, flat_image_dir: bool):
        self.path = _require_file(annotations_path, self.fmt)
        if split not in KARPATHY_SPLITS:
            raise ConfigError(f"format karpathy_json has no split {split!r}; known: {', '.join(KARPATHY_SPLITS)}")
        if not image_root.is_dir():
            raise DataError(str(image_root), f"image directory not found (format {self.fmt} expects it)")
        self.image_root = image_root
        self.flat_image_dir = flat_image_dir
        self._snapshot = _FileSnapshot(self.path)
        self._scanned: list[_KarpathyImage] | None = None
        super().__init__(split, f"karpathy_json {split} split ({'+'.join(KARPATHY_SPLITS[split])}) in "
                                f"{annotations_path} + {image_root}")

    @property
    def images_file(self) -> str:
        return str(self.image_root)

    def _scan(self) -> list[_KarpathyImage]:
        self._snapshot.check()
        if self._scanned is not None:
            return self._scanned
        try:
            data = json.loads(self.path.read_bytes().decode("utf-8-sig"))
        except UnicodeDecodeError as exc:
            raise DataError(str(self.path), f"not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
        except json.JSONDecodeError as exc:
            raise DataError(str(self.path), f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") \
                from None
        images = data.get("images") if isinstance(data, dict) else None
        if not isinstance(images, list):
            raise DataError(str(self.path), "expected a JSON object with an 'images' array (Karpathy's split format)")
        wanted = KARPATHY_SPLITS[self.split]
        scanned = []
        for index, item in enumerate(images):
            if not isinstance(item, dict):
                problem = f"images[{index}] is {_json_type(item)}, not an object"
                scanned.append(_KarpathyImage(index, None, None, [], problem))
                continue
            if item.get("split") not in wanted:
                continue
            problem = None
            image_id = item.get("cocoid", item.get("imgid"))
            if type(image_id) is not int:
                problem, image_id = f"has no integer cocoid or imgid (found {image_id!r})", None
            name, folder = item.get("filename"), item.get("filepath", "")
            path = None
            if not (isinstance(name, str) and _plain_file_name(name)):
                problem = problem or f"filename {name!r} is not a plain file name"
            elif not self.flat_image_dir and folder and not (isinstance(folder, str) and _plain_file_name(folder)):
                problem = problem or f"filepath {folder!r} is not a plain directory name"
            else:
                path = self.image_root / name if self.flat_image_dir or not folder else self.image_root / folder / name
            texts = []
            sentences = item.get("sentences")
            if not isinstance(sentences, list):
                texts.append((f"images[{index}]", None, "has no 'sentences' array"))
                sentences = []
            for position, sentence in enumerate(sentences):
                key = f"images[{index}].sentences[{position}]"
                if not isinstance(sentence, dict):
                    texts.append((key, None, f"sentence is {_json_type(sentence)}, not an object"))
                    continue
                sent_id, raw_text = sentence.get("sentid"), sentence.get("raw")
                obj: dict[str, Any] = {"text_id": sent_id, "text": raw_text}
                if image_id is not None:
                    obj["image_ids"] = [image_id]
                line_problem = None
                if isinstance(raw_text, str):
                    obj["text"] = clean_caption(raw_text)
                else:
                    line_problem = f"raw is {_json_type(raw_text)}, not a string"
                texts.append((key, obj, line_problem))
            scanned.append(_KarpathyImage(index, image_id, path, texts, problem))
        self._scanned = scanned
        return scanned

    def iter_images(self) -> Iterator[SourceImage]:
        for image in self._scan():
            if image.image_id is None and image.problem and image.path is None and not image.texts:
                continue  # not an image entry at all; reported once as a text record below
            payload: bytes = b""
            problem = image.problem
            if problem is None and image.path is not None:
                try:
                    data = image.path.read_bytes()
                except FileNotFoundError:
                    problem = f"image file not found (named by images[{image.index}] of {self.path.name})"
                except OSError as exc:
                    problem = f"cannot read the image file ({exc.strerror or exc})"
                else:
                    if not data:
                        problem = "image file is empty"
                    else:
                        payload = binascii.b2a_base64(data, newline=False)
            location = str(image.path) if image.path is not None else f"{self.path} images[{image.index}]"
            yield SourceImage(location, None, None, str(image.image_id), payload, problem)

    def iter_texts(self) -> Iterator[SourceText]:
        file = str(self.path)
        for image in self._scan():
            if not image.texts and image.problem:
                yield SourceText(file, None, f"images[{image.index}]", None, image.problem)
            for key, obj, problem in image.texts:
                yield SourceText(file, None, key, obj, problem)

    def input_bytes(self) -> int:
        total = self.path.stat().st_size
        for image in self._scan():
            if image.path is not None:
                try:
                    total += image.path.stat().st_size
                except OSError:
                    pass  # reported as a bad image by iter_images
        return total


def _max_lines(entry: Mapping[str, Any]) -> int | None:
    value = entry.get("max_lines")
    if value is None:
        return None
    if type(value) is not int or value < 1:
        raise ConfigError(f"max_lines must be a positive integer or null, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------


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
