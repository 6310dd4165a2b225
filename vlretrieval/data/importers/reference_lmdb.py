"""Reader for ``reference_lmdb``: LMDB splits written by Chinese-CLIP's ``build_lmdb_dataset.py``.

Their pairs are pickled; the unpickler here cannot reach any global, so no code in the data runs.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any, Iterator

import lmdb

from ...errors import DataError
from .base import SourceImage, SourceSplit, SourceText, parse_int_id, record_location


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
