"""Expected sha256 digests: normalising them, sidecar checksum files and the trust-on-first-use record."""

from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath
from typing import Any

from vlretrieval.errors import ChecksumMismatch, ConfigError, DownloadError
from vlretrieval.io import write_json

_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


def _normalise_digest(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _HEX64.fullmatch(value.strip()):
        raise ConfigError(f"{what}: {value!r} is not a 64-digit hex sha256")
    return value.strip().lower()



def _load_record(record_path: Path) -> dict[str, str]:
    if not record_path.exists():
        return {}
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DownloadError(f"checksum record {record_path} is unreadable: {exc}") from exc
    if not isinstance(record, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and _HEX64.fullmatch(v) for k, v in record.items()
    ):
        raise DownloadError(f"checksum record {record_path} must map file names to 64-digit hex sha256 values")
    return {k: v.lower() for k, v in record.items()}


def verify_or_record_checksum(name: str, digest: str, *, expected: str | None, record_path: Path) -> None:
    """Check ``digest`` of file ``name`` against ``expected``, or trust it on first use.

    With ``expected`` given the record is not consulted. Without it, ``record_path`` (a JSON
    object ``{file name: sha256}``) is the expectation: an unknown name is added to it, a known
    one must match. Raises :class:`ChecksumMismatch` naming the file and both digests.
    """
    digest = digest.lower()
    record_path = Path(record_path)
    if expected is not None:
        expected = _normalise_digest(expected, f"expected sha256 of {name}")
        if digest != expected:
            raise ChecksumMismatch(f"{name}: sha256 mismatch: expected {expected}, got {digest}")
        return
    record = _load_record(record_path)
    recorded = record.get(name)
    if recorded is None:
        record[name] = digest
        write_json(record_path, record)
    elif recorded != digest:
        raise ChecksumMismatch(
            f"{name}: sha256 mismatch: expected {recorded} (recorded on first download in {record_path}), "
            f"got {digest}; if the upstream file changed legitimately, delete its entry there and re-run"
        )


def _parse_sidecar(text: str, filename: str, source: str) -> str:
    entries: list[tuple[str | None, str]] = []
    for line_no, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        bsd = re.fullmatch(r"SHA256 \((.+)\) = ([0-9a-fA-F]{64})", line)
        if bsd:
            entries.append((bsd.group(1), bsd.group(2).lower()))
            continue
        fields = line.split(None, 1)
        if not _HEX64.fullmatch(fields[0]):
            raise DownloadError(
                f"checksum file {source}, line {line_no}: expected '<sha256>  <file name>', got {line!r}"
            )
        name = fields[1].strip().lstrip("*") if len(fields) > 1 else None
        entries.append((name, fields[0].lower()))
    if not entries:
        raise DownloadError(f"checksum file {source} contains no sha256")
    named = {d for n, d in entries if n is not None and PurePosixPath(n.replace("\\", "/")).name == filename}
    if len(named) == 1:
        return named.pop()
    if len(named) > 1:
        raise DownloadError(f"checksum file {source} lists conflicting digests for {filename}")
    # A single-entry sidecar describes the one file it ships with, whatever it calls it.
    if len(entries) == 1:
        return entries[0][1]
    raise DownloadError(f"checksum file {source} has no entry for {filename}")
