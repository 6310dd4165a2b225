"""What a fine-tuning run keeps in its work dir: checkpoints, the metrics log and the run identity.

What a run leaves in the work dir (``--output-dir``):

* ``checkpoint-<step>/``: Trainer checkpoints every ``save_steps`` (weights, optimizer, scheduler,
  ``trainer_state.json``, tokenizer, each rank's random generators ``rng_state.rank<r>.pkl``: see
  :mod:`vlretrieval.training.random_state`) plus :data:`CHECKPOINT_MARKER`, written last, which
  lists the files and sizes. Only checkpoints whose marker matches their files count as complete.
* ``train_log.jsonl``: one JSON object per line, written by rank 0 only. Every record has ``event``,
  ``step`` (global step) and ``time`` (unix seconds):

  - ``start`` / ``resume``: run facts (``world_size``, ``per_device_batch_size``,
    ``global_batch_size`` (pairs per optimizer step), ``gradient_accumulation_steps``,
    ``train_pairs``, ``max_steps``, ``hparams``; ``checkpoint`` on a resume);
  - ``train``, one per logging step: ``loss`` (mean over ranks of the local losses, which is the
    CLIP loss of the global batch), ``lr`` (the rate the optimizer applied in that step),
    ``logit_scale``, ``samples_per_second`` (global samples over the logging interval), ``epoch``;
    for families whose loss is a sum of parts (BridgeTower: ``itc`` + ``itm``), ``loss_parts``,
    each averaged the same way;
  - ``end``: ``train_runtime``, ``train_samples_per_second``, ``mean_loss`` over this run's steps.
* :data:`RUN_IDENTITY_FILE`: what the checkpoints depend on (:func:`run_identity`); a run with
  another identity discards them (:func:`claim_work_dir`).

A rerun after a kill resumes from the newest complete checkpoint (model, optimizer, scheduler, data
position and every rank's RNG) and ends with the weights an uninterrupted run ends with; it deletes
incomplete ones, and truncates ``train_log.jsonl`` to the resumed step so
no step is logged twice.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Iterator, Mapping

from ..io import atomic_open

_log = logging.getLogger(__name__)


TRAIN_LOG = "train_log.jsonl"
CHECKPOINT_MARKER = "vlretrieval_checkpoint.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def _checkpoint_step(path: Path) -> int | None:
    match = _CHECKPOINT_RE.match(path.name)
    return int(match.group(1)) if match and path.is_dir() else None


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``checkpoint-<step>`` directory, newest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for child in output_dir.iterdir():
        try:
            step = _checkpoint_step(child)
        except OSError:  # removed while listing
            continue
        if step is not None:
            found.append((step, child))
    return sorted(found, reverse=True)


def write_checkpoint_marker(checkpoint_dir: str | os.PathLike, global_step: int) -> Path:
    """Record the files of a finished checkpoint; their presence and sizes define completeness."""
    checkpoint_dir = Path(checkpoint_dir)
    files = {
        str(path.relative_to(checkpoint_dir)): path.stat().st_size
        for path in sorted(checkpoint_dir.rglob("*"))
        if path.is_file() and path.name != CHECKPOINT_MARKER
    }
    marker = checkpoint_dir / CHECKPOINT_MARKER
    with atomic_open(marker) as handle:
        json.dump({"global_step": int(global_step), "files": files}, handle, indent=1)
    return marker


def is_complete_checkpoint(checkpoint_dir: str | os.PathLike) -> bool:
    """True when the marker exists, names the trainer state, and every listed file has its recorded size."""
    checkpoint_dir = Path(checkpoint_dir)
    try:
        with open(checkpoint_dir / CHECKPOINT_MARKER, "r", encoding="utf-8") as handle:
            marker = json.load(handle)
        files = marker["files"]
        if "trainer_state.json" not in files:
            return False
        return all((checkpoint_dir / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def find_resumable_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in ``output_dir``, or None."""
    for _, path in list_checkpoints(output_dir):
        if is_complete_checkpoint(path):
            return path
    return None


def remove_incomplete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Delete the checkpoints a killed run left half-written; returns their paths.

    Otherwise a later save into the same ``checkpoint-<step>`` name would mix old and new files, and
    checkpoint rotation would count them.
    """
    removed = []
    for _, path in list_checkpoints(output_dir):
        if not is_complete_checkpoint(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def iter_train_log(path: str | os.PathLike, *, strict: bool = False) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``("path:line", record)`` for each record of a ``train_log.jsonl``.

    The log is appended one line at a time, so a kill can leave the last line unfinished; that line is
    skipped. Any other line that is not a JSON object raises :class:`DataError` with ``strict`` and is
    skipped otherwise. A missing file raises ``FileNotFoundError``.
    """
    from ..errors import DataError

    with open(path, "r", encoding="utf-8") as handle:
        lines = handle.readlines()
    for line_no, line in enumerate(lines, start=1):
        where = f"{path}:{line_no}"
        if not line.endswith("\n") and line_no == len(lines):
            _log.warning("%s: last line is incomplete (a killed writer); it is skipped", where)
            break
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            record, problem = None, f"invalid JSON: {exc}"
        else:
            problem = None if isinstance(record, dict) else f"expected a JSON object, found {type(record).__name__}"
        if problem is not None:
            if strict:
                raise DataError(where, problem)
            continue
        yield where, record


def read_train_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every readable record of a ``train_log.jsonl`` (none when the file does not exist yet)."""
    try:
        return [record for _, record in iter_train_log(path)]
    except FileNotFoundError:
        return []


def truncate_train_log(path: str | os.PathLike, last_step: int) -> None:
    """Keep the steps up to ``last_step`` (atomically), so resumed steps are not logged twice.

    Other events (start, resume, end) are kept only before ``last_step``: the run that resumes there
    writes its own, and an earlier attempt's events at that step would appear twice.
    """
    path = Path(path)
    if not path.exists():
        return

    def keep(record: dict) -> bool:
        step = int(record.get("step", 0))
        return step <= last_step if record.get("event") == "train" else step < last_step

    kept = [r for r in read_train_log(path) if keep(r)]
    with atomic_open(path) as handle:
        for record in kept:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


RUN_IDENTITY_FILE = "run_identity.json"
# How often a run logs and saves, and how it loads data, do not change its numbers, so a rerun that
# changes only these resumes. The schedule length does change them (the cosine decay spans the whole
# run), so it belongs to the identity like every other setting.
RESUMABLE_CHANGES = frozenset({"logging_steps", "save_steps", "save_total_limit", "dataloader_num_workers"})


def run_identity(model_dir: str | os.PathLike, train_data: str | os.PathLike, hparams: Mapping[str, Any],
                 n_ranks: int, regions: str | os.PathLike | None = None) -> dict[str, Any]:
    """What a run's checkpoints depend on: starting weights, training data, recipe and world size.

    Keys in :data:`RESUMABLE_CHANGES` are left out: changing them resumes the same run.
    """
    from ..io import sha256_file

    from ..data.regions import REGIONS_DIR

    model_dir, train_data = Path(model_dir), Path(train_data)
    identity = {
        "weights": {p.name: sha256_file(p) for p in sorted(model_dir.glob("*.pdparams"))},
        "train_texts": sha256_file(train_data / "texts.jsonl"),
        "train_images": sha256_file(train_data / "imgs" / "data.mdb"),
        "hparams": {key: value for key, value in sorted(hparams.items()) if key not in RESUMABLE_CHANGES},
        "ranks": int(n_ranks),
    }
    if regions is not None:
        identity["train_regions"] = sha256_file(Path(regions) / REGIONS_DIR / "data.mdb")
    return identity


def claim_work_dir(work_dir: str | os.PathLike, identity: Mapping[str, Any]) -> bool:
    """Make ``work_dir`` belong to the run ``identity``; returns True when checkpoints were discarded.

    Checkpoints left by a run with other weights, data, hyperparameters or world size must not be
    resumed: the result would silently mix two recipes. They are removed, with a message.
    """
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    path = work_dir / RUN_IDENTITY_FILE
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        previous = None
    discarded = False
    if previous != json.loads(json.dumps(identity)):
        stale = [p for _, p in list_checkpoints(work_dir)]
        if stale or (work_dir / TRAIN_LOG).exists():
            print(f"{work_dir}: checkpoints belong to a different run (weights, data, hyperparameters or "
                  f"ranks changed); removing {len(stale)} checkpoint(s) and starting over", file=sys.stderr)
            discarded = True
        for checkpoint in stale:
            shutil.rmtree(checkpoint)
        (work_dir / TRAIN_LOG).unlink(missing_ok=True)
        with atomic_open(path) as handle:
            json.dump(identity, handle, indent=2, sort_keys=True)
    return discarded
