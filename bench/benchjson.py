"""Write a bench's figures to a JSON file, by name, with the context needed to compare runs.

Every bench under ``bench/`` takes ``--json FILE`` and ends with one call::

    write_figures(args.json, "bench_topk", {"project_over_bare": 1.08, "project_s": 6.1, ...},
                  command=" ".join(sys.argv), threads=2, texts=25000)

The file holds ``bench`` (the script's name), ``figures`` (ratios and the raw times they come from,
numbers only), ``context`` (the bench's own parameters, plus anything else worth keeping) and
``machine`` (host, CPU count, Python, git commit, UTC date). ``bench/table.py`` reads these files to
regenerate the table in ``docs/benchmarks.md``. The write is atomic, so a killed bench never leaves
a half-written file that the table would read.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping

from vlretrieval.io import atomic_open

FORMAT_VERSION = 1
REPO_ROOT = Path(__file__).resolve().parent.parent


def git_commit(root: Path = REPO_ROOT) -> str | None:
    """The checked-out commit, with ``-dirty`` when the tree has local edits; ``None`` outside git."""
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], check=True,
                                capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               check=True, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")


def machine_context() -> dict[str, Any]:
    """Where and when the figures were measured."""
    return {
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def invocation() -> str:
    """The command line that ran this bench, as one would type it from the repository root."""
    script = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    if script is None or not script.is_file():
        return " ".join(sys.argv)
    try:
        shown = script.relative_to(REPO_ROOT).as_posix()
    except ValueError:
        shown = str(script)
    return " ".join(["python", shown, *sys.argv[1:]])


def _jsonable(value: Any) -> Any:
    # numpy scalars and paths turn up in bench parameters; keep the file plain JSON.
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value


def write_figures(path: str | os.PathLike | None, bench: str, figures: Mapping[str, float],
                  **context: Any) -> dict[str, Any] | None:
    """Write ``figures`` (name -> number) for ``bench`` to ``path`` atomically; return the document.

    ``path`` may be ``None`` (the bench was run without ``--json``): nothing is written. Every figure
    must be a finite number, so a table built from the file never shows a placeholder as a result.
    """
    clean: dict[str, float] = {}
    for name, value in figures.items():
        value = _jsonable(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{bench}: figure {name!r} must be a finite number, got {value!r}")
        clean[str(name)] = value
    if not clean:
        raise ValueError(f"{bench}: no figures to write")
    context.setdefault("command", invocation())
    document = {
        "format": FORMAT_VERSION,
        "bench": bench,
        "figures": clean,
        "context": _jsonable(context),
        "machine": machine_context(),
    }
    if path is None:
        return document
    with atomic_open(path, "w") as handle:
        handle.write(json.dumps(document, indent=2, sort_keys=False) + "\n")
    return document
