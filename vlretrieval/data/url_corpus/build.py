"""The whole build of a ``url_csv`` dataset: plan the rows, obtain the images, write the raw layout and report."""

from __future__ import annotations

import array
import contextlib
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ...errors import ConfigError, DataError
from ...io import atomic_directory, sha256_file, write_json
from .. import raw
from ..importers.base import _FileSnapshot
from ..validation import POLICIES, _digest
from .csv_rows import CsvRow, read_csv_rows
from .images import IMAGE_CATEGORIES, ImageDownloader, Outcome
from .settings import UrlCorpusSettings
from .splits import assign_splits

log = logging.getLogger(__name__)

REPORT_NAME = "url_corpus_report.json"
DROPPED_NAME = "url_corpus_dropped.jsonl"

# Why a row can be dropped. Row defects come from the CSV itself; the rest from its image.
ROW_CATEGORIES = ("bad_row", "duplicate_row", "filename_conflict")
DROP_CATEGORIES = ROW_CATEGORIES + IMAGE_CATEGORIES
_PROGRESS_EVERY = 30.0


@dataclass
class _Plan:
    """Pass one over the CSV: distinct images and, per row, its image or why it is unusable."""

    names: list[str]
    urls: list[str]
    image_of: dict[str, int]
    row_image: array.array  # per data row: image id, or -1 when the row itself is dropped
    row_drops: dict[int, tuple[int, str | None, str | None, str, str]]  # index -> line, filename, url, category, reason
    rows: int


def _bad_row(csv_path: Path, row: CsvRow, category: str, reason: str, policy: str) -> tuple:
    if policy == "error":
        record = f"filename={row.filename!r}" if row.filename else None
        raise DataError(
            f"{csv_path}:{row.line}",
            f"{reason} (set data.on_bad_record: skip to drop such rows and list them in {DROPPED_NAME})",
            record,
        )
    return (row.line, row.filename, row.url, category, reason)


def _plan(csv_path: Path, policy: str) -> _Plan:
    names: list[str] = []
    urls: list[str] = []
    image_of: dict[str, int] = {}
    first_line: list[int] = []
    seen_rows: dict[bytes, int] = {}
    row_image = array.array("q")
    row_drops: dict[int, tuple] = {}
    rows = 0
    for row in read_csv_rows(csv_path):
        rows += 1
        image_id = -1
        if row.problem is not None:
            row_drops[row.index] = _bad_row(csv_path, row, "bad_row", row.problem, policy)
        else:
            known = image_of.get(row.filename)
            row_key = _digest(f"{row.text}\0{row.filename}".encode("utf-8"))
            if known is not None and urls[known] != row.url:
                reason = (f"filename {row.filename!r} was given another url on line {first_line[known]} "
                          f"({urls[known][:200]}); one file cannot hold two images")
                row_drops[row.index] = _bad_row(csv_path, row, "filename_conflict", reason, policy)
            elif row_key in seen_rows:
                reason = f"repeats line {seen_rows[row_key]} (same text and filename)"
                row_drops[row.index] = _bad_row(csv_path, row, "duplicate_row", reason, policy)
            else:
                seen_rows[row_key] = row.line
                if known is None:
                    known = image_of[row.filename] = len(names)
                    names.append(row.filename)
                    urls.append(row.url)
                    first_line.append(row.line)
                image_id = known
        row_image.append(image_id)
    if rows == 0:
        raise DataError(str(csv_path), "the CSV has a header but no data rows")
    return _Plan(names, urls, image_of, row_image, row_drops, rows)


class _ProgressLog:
    def __init__(self, total: int):
        self.total = total
        self.done = 0
        self.kept = 0
        self.started = self.last = time.monotonic()

    def update(self, outcome: Outcome) -> None:
        self.done += 1
        self.kept += outcome.kept
        now = time.monotonic()
        if now - self.last >= _PROGRESS_EVERY or self.done == self.total:
            self.last = now
            rate = self.done / max(now - self.started, 1e-9)
            log.info("images %d/%d done, %d kept, %.1f images/s", self.done, self.total, self.kept, rate)


def build_url_corpus(
    entry: Mapping[str, Any],
    source_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike,
    policy: str = "error",
) -> dict[str, Any]:
    """Build the raw layout of a ``url_csv`` dataset at ``out_dir``; return the report.

    ``entry`` is the registry entry (``splits``, ``root`` and the ``url_corpus`` block);
    the CSV is ``source_dir / root / url_corpus.csv``. ``policy`` (``error`` or ``skip``)
    applies to defective CSV rows; images that cannot be fetched or fail the filter are always
    dropped and reported. ``out_dir`` receives, atomically as a whole, ``{split}_imgs.tsv`` and
    ``{split}_texts.jsonl`` for every split in ``splits``, :data:`REPORT_NAME` (settings,
    counts per category and split) and :data:`DROPPED_NAME` (one line per dropped CSV row:
    line, filename, url, category, reason and, for an image that failed, the split it is missing
    from; in CSV order). Split membership is a function of the CSV and the settings alone
    (:func:`~vlretrieval.data.url_corpus.splits.assign_splits` over every distinct file name).
    """
    if policy not in POLICIES:
        raise ConfigError(f"unknown bad-record policy {policy!r}; expected one of {', '.join(POLICIES)}")
    if entry.get("format", "url_csv") != "url_csv":
        raise ConfigError(f"dataset format is {entry.get('format')!r}, not url_csv")
    settings = UrlCorpusSettings.from_entry(entry)
    splits = list(entry.get("splits") or [])
    if not splits or any(split not in raw.SPLITS for split in splits):
        raise ConfigError(f"splits must be a non-empty list of {', '.join(raw.SPLITS)}, got {splits!r}")
    # Fails on a bad split configuration before the first request, not after the last.
    assign_splits([], splits, settings.split_sizes, settings.split_salt)
    csv_path = Path(source_dir) / str(entry.get("root") or ".") / settings.csv
    if not csv_path.is_file():
        raise DataError(str(csv_path), "CSV file not found (url_corpus.csv names it, relative to the download's root)")
    snapshot = _FileSnapshot(csv_path)

    started = time.monotonic()
    plan = _plan(csv_path, policy)
    log.info("%s: %d data rows, %d distinct images, %d rows dropped as defective",
             csv_path, plan.rows, len(plan.names), len(plan.row_drops))

    downloader = ImageDownloader(
        cache_dir, min_side=settings.min_image_side, drop_gif=settings.drop_gif, max_bytes=settings.max_image_bytes,
        threads=settings.threads, timeout=settings.timeout, retries=settings.retries, backoff=settings.backoff,
    )
    outcomes: list[Outcome | None] = [None] * len(plan.names)
    progress = _ProgressLog(len(plan.names))
    sources: Counter = Counter()
    for outcome in downloader.run(zip(plan.names, plan.urls)):
        outcomes[plan.image_of[outcome.filename]] = outcome
        sources[outcome.source] += 1
        progress.update(outcome)
    download_seconds = time.monotonic() - started

    # Membership follows from the CSV alone: every distinct file name takes part in the ranking,
    # whether or not its image arrived in this run. An image that failed is missing from its
    # split, never replaced by another, so two runs evaluate the same queries wherever both have
    # the images.
    split_of = assign_splits(plan.names, splits, settings.split_sizes, settings.split_salt)
    images_per_split = Counter(split_of[i] for i, outcome in enumerate(outcomes) if outcome.kept)
    missing_per_split = Counter(split_of[i] for i, outcome in enumerate(outcomes) if not outcome.kept)
    empty = [split for split in splits if images_per_split[split] == 0]
    if empty:
        raise DataError(
            str(csv_path),
            f"no image is left for the split(s) {', '.join(empty)} "
            f"({sum(o.kept for o in outcomes)} of {len(outcomes)} images passed the filter; see the log)",
        )
    for split in splits:
        if missing_per_split[split]:
            log.warning("split %s is missing %d of its %d images: they failed or did not pass the filter "
                        "(each listed in %s with its reason)", split, missing_per_split[split],
                        missing_per_split[split] + images_per_split[split], DROPPED_NAME)

    snapshot.check()
    out_dir = Path(out_dir)
    row_categories: Counter = Counter()
    image_categories = Counter(o.rejection.category for o in outcomes if not o.kept)
    texts_per_split: Counter = Counter()
    with atomic_directory(out_dir) as tmp, contextlib.ExitStack() as stack:
        texts_out = {split: stack.enter_context(open(raw.texts_jsonl_path(tmp, split), "w", encoding="utf-8"))
                     for split in splits}
        dropped_out = stack.enter_context(open(tmp / DROPPED_NAME, "w", encoding="utf-8"))

        def drop(line: int, filename: str | None, url: str | None, category: str, reason: str,
                 split: str | None = None) -> None:
            row_categories[category] += 1
            dropped_out.write(json.dumps({"line": line, "filename": filename, "url": url, "category": category,
                                          "reason": reason, "split": split}, ensure_ascii=False) + "\n")

        for row in read_csv_rows(csv_path):
            image_id = plan.row_image[row.index]
            if image_id < 0:
                drop(*plan.row_drops[row.index])
                continue
            outcome = outcomes[image_id]
            if not outcome.kept:
                drop(row.line, row.filename, row.url, outcome.rejection.category, outcome.rejection.reason,
                     split_of[image_id])
                continue
            split = split_of[image_id]
            if split is None:
                continue  # a kept image outside every split: counted, not an error
            raw.write_text_line(texts_out[split], row.index, row.text, [image_id])
            texts_per_split[split] += 1

        image_bytes = 0
        for split in splits:
            with open(raw.images_tsv_path(tmp, split), "w", encoding="utf-8") as handle:
                for image_id, name in enumerate(plan.names):
                    if split_of[image_id] != split or not outcomes[image_id].kept:
                        continue
                    path = downloader.images_dir / name
                    try:
                        data = path.read_bytes()
                    except FileNotFoundError:
                        data = b""
                    if _digest(data) != outcomes[image_id].digest:
                        raise DataError(str(path), "the cached image changed or vanished while the dataset was built; "
                                        "run the job again")
                    raw.write_image_line(handle, image_id, data)
                    image_bytes += len(data)
                # Durable before the directory is renamed into place, like the texts below.
                handle.flush()
                os.fsync(handle.fileno())
        for handle in (*texts_out.values(), dropped_out):
            handle.flush()
            os.fsync(handle.fileno())
        snapshot.check()

        report = {
            "csv": str(csv_path),
            "csv_sha256": sha256_file(csv_path),
            "cache_dir": str(downloader.cache_dir),
            "policy": policy,
            "settings": {
                "split_sizes": dict(settings.split_sizes), "split_salt": settings.split_salt,
                "min_image_side": settings.min_image_side, "drop_gif": settings.drop_gif,
                "max_image_mb": settings.max_image_mb, "threads": settings.threads, "timeout": settings.timeout,
                "retries": settings.retries, "backoff": settings.backoff,
            },
            "rows": {
                "read": plan.rows,
                "kept": sum(texts_per_split.values()),
                "dropped": sum(row_categories.values()),
                "unassigned": plan.rows - sum(texts_per_split.values()) - sum(row_categories.values()),
                "dropped_by_category": {c: row_categories[c] for c in DROP_CATEGORIES if row_categories[c]},
            },
            "images": {
                "distinct": len(plan.names),
                "kept": sum(o.kept for o in outcomes),
                "dropped": sum(image_categories.values()),
                "unassigned": sum(1 for i, outcome in enumerate(outcomes) if outcome.kept and split_of[i] is None),
                "dropped_by_category": {c: image_categories[c] for c in IMAGE_CATEGORIES if image_categories[c]},
                "bytes": image_bytes,
                "from_cache": sources["cache"],
                "from_rejected_cache": sources["rejected_cache"],
                "fetched": sources["download"],
                "seconds": round(download_seconds, 3),
            },
            "splits": {
                split: {"requested": settings.split_sizes.get(split), "images": images_per_split[split],
                        "missing_images": missing_per_split[split], "texts": texts_per_split[split]}
                for split in splits
            },
        }
        write_json(tmp / REPORT_NAME, report)
    log.info("wrote %s: %s; rows dropped by reason: %s (each listed in %s)", out_dir,
             ", ".join(f"{s} {v['images']} images / {v['texts']} texts" for s, v in report["splits"].items()),
             report["rows"]["dropped_by_category"] or "none", DROPPED_NAME)
    return report
