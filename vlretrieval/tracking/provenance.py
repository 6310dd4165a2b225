"""What identifies a tracked result: the effective config, the code version and the data version."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

from ..data.download import MANIFEST_NAME
from ..errors import DataError


def config_hash(config: Any) -> str:
    """Short, order-independent hash of a JSON-serialisable config."""
    canonical = json.dumps(config, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def git_commit(repo_dir: str | os.PathLike) -> str:
    """The commit the workflow code is at, with ``-dirty`` when tracked files differ from it."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_dir, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo_dir,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


def dataset_checksum(download_dir: str | os.PathLike) -> str:
    """The sha256 of the dataset's fetched files (one file: its digest; several: a digest of digests)."""
    manifest_path = Path(download_dir) / MANIFEST_NAME
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(str(manifest_path), f"cannot read the download manifest: {exc}") from None
    digests = [entry["sha256"] for entry in manifest["files"]]
    if len(digests) == 1:
        return digests[0]
    return hashlib.sha256("\n".join(sorted(digests)).encode()).hexdigest()
