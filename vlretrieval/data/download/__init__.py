"""Fetch, verify and unpack the dataset sources listed in ``config/datasets.yaml``.

Every file of a registry entry is fetched into a per-dataset cache, checked against a known
sha256 (given in the entry, read from a ``sha256sum``-style sidecar, or recorded on first
download and trusted from then on) and only then extracted or copied into the dataset
directory. The dataset directory is assembled beside its final place and renamed into it, so a
failed or interrupted run leaves either the previous directory or nothing.

Sources are ``http(s)://`` URLs, ``file://`` URLs or plain paths; relative paths are resolved
against the working directory (the project root when run by the workflow).

The jobs live in their own modules: :mod:`.fetch` (one file over HTTP(S) or from a local path,
resumed and retried), :mod:`.checksums` (expected digests and the trust-on-first-use record),
:mod:`.extract` (zip and tar extraction that refuses members escaping the target) and
:mod:`.dataset` (a registry entry assembled into a dataset directory with its manifest).
"""

from __future__ import annotations

from .checksums import verify_or_record_checksum
from .dataset import MANIFEST_NAME, download_dataset
from .extract import CorruptArchive, UnsafeArchive, safe_extract
from .fetch import (
    RETRYABLE_STATUS,
    USER_AGENT,
    DownloadTimeout,
    HTTPStatusError,
    IncompleteDownload,
    SourceUnreachable,
    fetch,
)

__all__ = [
    "CorruptArchive",
    "DownloadTimeout",
    "HTTPStatusError",
    "IncompleteDownload",
    "MANIFEST_NAME",
    "RETRYABLE_STATUS",
    "SourceUnreachable",
    "USER_AGENT",
    "UnsafeArchive",
    "download_dataset",
    "fetch",
    "safe_extract",
    "verify_or_record_checksum",
]
