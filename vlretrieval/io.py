"""Atomic output helpers: a killed job never leaves a half-written file that looks finished."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _tmp_sibling(path: Path, suffix: str = "") -> Path:
    # The temporary lives in the destination's directory so the final rename stays on one filesystem.
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f"{suffix}.tmp", dir=path.parent)
    # mkstemp creates 0600 files; results are shared (e.g. on a cluster), so honour the umask instead.
    os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    return Path(name)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[Any]:
    """Open a temporary file for writing that replaces ``path`` only on success."""
    if not any(flag in mode for flag in "wx"):
        raise ValueError(f"atomic_open writes only, got mode {mode!r}")
    with atomic_path(path) as tmp:
        if "b" not in mode:
            kwargs.setdefault("encoding", "utf-8")
        with open(tmp, mode.replace("x", "w"), **kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``path`` only if the block succeeds.

    An existing ``path`` is replaced as a whole, so readers never see a mix of old and new files.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_staging(path)
    prefix = f".{path.name}.{_owner_tag()}."
    tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=prefix, suffix=".old", dir=path.parent))
            os.replace(path, old / "replaced")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _owner_tag() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def remove_abandoned_staging(path: str | os.PathLike) -> list[Path]:
    """Delete staging directories of ``path`` left by a killed process of this host.

    A SIGKILL skips every cleanup, and a staging directory can hold gigabytes (a serialized split).
    Only directories whose owning process no longer exists on this host are removed, so a writer on
    another node of a shared filesystem is never disturbed.
    """
    path = Path(path)
    host = socket.gethostname()
    removed = []
    for candidate in path.parent.glob(f".{glob.escape(path.name)}.*"):
        owner = candidate.name[len(path.name) + 2:].split(".", 1)[0]
        owner_host, _, pid = owner.rpartition("-")
        if candidate.suffix not in (".tmp", ".old") or owner_host != host or not pid.isdigit():
            continue
        if _process_exists(int(pid)):
            continue
        shutil.rmtree(candidate, ignore_errors=True)
        removed.append(candidate)
    return removed


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented UTF-8 JSON, atomically."""
    with atomic_open(path) as handle:
        json.dump(obj, handle, ensure_ascii=False, indent=2, sort_keys=False)
        handle.write("\n")


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so large archives do not fill memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def iter_jsonl_objects(path: str | os.PathLike, *, skip_blank: bool = False, blank_hint: str = "") -> Iterator[tuple[str, int, dict]]:
    """Yield ``(where, line_no, object)`` for each line of a JSON-lines file whose lines are objects.

    ``where`` is ``path:line`` for error messages. A blank line is skipped with ``skip_blank``, else it
    is an error (``blank_hint`` says why it matters); invalid JSON or a non-object line is an error.
    """
    from .errors import DataError

    path = str(path)
    with open(path, "r", encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            where = f"{path}:{line_no}"
            if not line.strip():
                if skip_blank:
                    continue
                raise DataError(where, f"blank line{blank_hint}")
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(where, f"invalid JSON: {exc.msg}, column {exc.colno}") from None
            if not isinstance(obj, dict):
                raise DataError(where, f"expected a JSON object, found {type(obj).__name__}")
            yield where, line_no, obj
