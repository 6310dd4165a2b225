"""Dataset download step against real files, real archives and a real local HTTP server."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import shutil
import socket
import tarfile
import threading
import time
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from vlretrieval.data.download import (
    MANIFEST_NAME,
    CorruptArchive,
    DownloadTimeout,
    HTTPStatusError,
    IncompleteDownload,
    SourceUnreachable,
    UnsafeArchive,
    download_dataset,
    fetch,
    safe_extract,
    verify_or_record_checksum,
)
from vlretrieval.errors import ChecksumMismatch, ConfigError, DownloadError

FAST = {"backoff": 0.01, "progress": False}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name, date_time=(2024, 1, 2, 3, 4, 6)), data)
    return buffer.getvalue()


def make_tar(members: list[tarfile.TarInfo | tuple[str, bytes]], mode: str = "w:gz") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tf:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tf.addfile(member)
            else:
                name, data = member
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


DEMO_MEMBERS = {
    "demo/train_texts.jsonl": '{"text_id": 1, "text": "红色的圆", "image_ids": [1]}\n'.encode(),
    "demo/train_imgs.tsv": b"1\taGVsbG8=\n",
}
DEMO_ZIP = make_zip(DEMO_MEMBERS)


# --------------------------------------------------------------------------------------------
# a local HTTP server with Range support and deliberate connection drops


@dataclass
class ServerState:
    files: dict[str, bytes] = field(default_factory=dict)
    requests: list[dict] = field(default_factory=list)
    # path -> absolute byte offset at which the connection is cut
    cut_at: dict[str, int] = field(default_factory=dict)
    cut_once: bool = False
    honor_range: bool = True
    status: dict[str, int] = field(default_factory=dict)
    delay: float = 0.0
    base: str = ""

    def url(self, path: str) -> str:
        return self.base + path


class RangeHandler(BaseHTTPRequestHandler):
    server_version = "TestServer/1.0"

    def log_message(self, format, *args):  # keep test output clean
        pass

    def do_GET(self):
        state: ServerState = self.server.state
        state.requests.append({"path": self.path, "range": self.headers.get("Range")})
        if state.delay:
            time.sleep(state.delay)
        if self.path in state.status:
            self.send_error(state.status[self.path])
            return
        data = state.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start, status = 0, 200
        requested = self.headers.get("Range")
        if requested and state.honor_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", requested).group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        self.send_response(status)
        self.send_header("Content-Length", str(len(data) - start))
        self.send_header("ETag", f'"{sha256(data)[:16]}"')
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        cut = state.cut_at.get(self.path)
        if cut is not None:
            if state.cut_once:
                del state.cut_at[self.path]
            self.wfile.write(data[start:max(start, cut)])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(data[start:])


@pytest.fixture
def server():
    state = ServerState()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    httpd.daemon_threads = True
    httpd.block_on_close = False
    httpd.state = state
    state.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


@pytest.fixture
def dirs(tmp_path):
    return {
        "dest_dir": tmp_path / "data" / "demo",
        "cache_dir": tmp_path / "cache",
        "checksum_dir": tmp_path / "checksums",
    }


def leftovers(directory: Path) -> list[str]:
    """Temporary or partial names a failed run must not leave behind."""
    if not directory.exists():
        return []
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".") or p.name.endswith(".part"))


# --------------------------------------------------------------------------------------------
# local sources


def test_local_zip_is_fetched_extracted_and_listed_in_manifest(tmp_path, dirs):
    source = tmp_path / "sources" / "demo.zip"
    source.parent.mkdir()
    source.write_bytes(DEMO_ZIP)
    entry = {"files": [{"url": str(source), "sha256": sha256(DEMO_ZIP).upper()}]}

    result = download_dataset("demo", entry, **dirs, **FAST)

    assert result == dirs["dest_dir"]
    for name, data in DEMO_MEMBERS.items():
        assert (result / name).read_bytes() == data
    manifest = json.loads((result / MANIFEST_NAME).read_text(encoding="utf-8"))
    assert manifest == {
        "dataset": "demo",
        "files": [
            {
                "filename": "demo.zip",
                "source": str(source),
                "sha256": sha256(DEMO_ZIP),
                "size": len(DEMO_ZIP),
                "extracted": True,
                "contents": list(DEMO_MEMBERS),
            }
        ],
    }
    assert (dirs["cache_dir"] / "demo" / "demo.zip").read_bytes() == DEMO_ZIP
    assert oct(result.stat().st_mode & 0o777) == oct(0o755)
    assert leftovers(result.parent) == []
    # An explicit sha256 is not copied into the trust-on-first-use record.
    assert not (dirs["checksum_dir"] / "demo.json").exists()


def test_file_url_and_plain_file_are_copied_not_extracted(tmp_path, dirs):
    data_file = tmp_path / "test.coco_cn.data"
    data_file.write_bytes(b"text\t1\tbase64\n" * 100)
    notes = tmp_path / "notes.zip"
    notes.write_bytes(DEMO_ZIP)
    entry = {
        "files": [
            {"url": data_file.as_uri()},
            {"url": str(notes), "extract": False, "filename": "kept.zip"},
        ]
    }

    result = download_dataset("demo", entry, **dirs, **FAST)

    assert (result / "test.coco_cn.data").read_bytes() == data_file.read_bytes()
    assert (result / "kept.zip").read_bytes() == DEMO_ZIP
    assert sorted(p.name for p in result.iterdir()) == [MANIFEST_NAME, "kept.zip", "test.coco_cn.data"]
    record = json.loads((dirs["checksum_dir"] / "demo.json").read_text())
    assert record == {"test.coco_cn.data": sha256(data_file.read_bytes()), "kept.zip": sha256(DEMO_ZIP)}
    manifest = json.loads((result / MANIFEST_NAME).read_text())
    assert [f["extracted"] for f in manifest["files"]] == [False, False]
    assert manifest["files"][0]["source"] == data_file.as_uri()


def test_missing_local_source_is_a_clear_error(tmp_path, dirs):
    entry = {"files": [{"url": str(tmp_path / "nope.zip")}]}
    with pytest.raises(DownloadError, match=r"nope\.zip: local source file does not exist"):
        download_dataset("demo", entry, **dirs, **FAST)
    assert not dirs["dest_dir"].exists()


def test_rerun_replaces_dataset_directory_as_a_whole(tmp_path, dirs):
    source = tmp_path / "demo.zip"
    source.write_bytes(DEMO_ZIP)
    entry = {"files": [{"url": str(source)}]}
    download_dataset("demo", entry, **dirs, **FAST)
    (dirs["dest_dir"] / "stray.txt").write_text("from an older layout")

    download_dataset("demo", entry, **dirs, **FAST)

    assert not (dirs["dest_dir"] / "stray.txt").exists()
    assert (dirs["dest_dir"] / "demo" / "train_imgs.tsv").read_bytes() == DEMO_MEMBERS["demo/train_imgs.tsv"]
    assert leftovers(dirs["dest_dir"].parent) == []


# --------------------------------------------------------------------------------------------
# HTTP


def test_http_download_then_rerun_uses_cache_without_network(server, dirs):
    server.files["/demo.zip"] = DEMO_ZIP
    entry = {"files": [{"url": server.url("/demo.zip")}]}

    download_dataset("demo", entry, **dirs, **FAST)

    assert server.requests == [{"path": "/demo.zip", "range": None}]
    assert (dirs["dest_dir"] / "demo" / "train_texts.jsonl").read_bytes() == DEMO_MEMBERS["demo/train_texts.jsonl"]
    record_path = dirs["checksum_dir"] / "demo.json"
    assert json.loads(record_path.read_text()) == {"demo.zip": sha256(DEMO_ZIP)}
    cache = dirs["cache_dir"] / "demo"
    assert sorted(p.name for p in cache.iterdir()) == ["demo.zip"]  # no .part, no resume metadata

    server.requests.clear()
    server.files["/demo.zip"] = b"the server would now serve something else"
    shutil.rmtree(dirs["dest_dir"])
    download_dataset("demo", entry, **dirs, **FAST)

    assert server.requests == []
    manifest = json.loads((dirs["dest_dir"] / MANIFEST_NAME).read_text())
    assert manifest["files"][0]["sha256"] == sha256(DEMO_ZIP)
    assert manifest["files"][0]["source"] == server.url("/demo.zip")


def test_cached_file_with_wrong_digest_is_fetched_again(server, tmp_path):
    server.files["/a.bin"] = b"good bytes"
    dest = tmp_path / "a.bin"
    dest.write_bytes(b"stale bytes")

    digest = fetch(server.url("/a.bin"), dest, expected_sha256=sha256(b"good bytes"), **FAST)

    assert digest == sha256(b"good bytes")
    assert dest.read_bytes() == b"good bytes"
    assert len(server.requests) == 1


def test_resume_of_partial_download_uses_range(server, tmp_path):
    data = random.Random(0).randbytes(300_000)
    server.files["/big.bin"] = data
    server.cut_at["/big.bin"] = 100_000
    dest = tmp_path / "cache" / "big.bin"
    part = dest.with_name("big.bin.part")

    with pytest.raises(IncompleteDownload) as info:
        fetch(server.url("/big.bin"), dest, retries=1, **FAST)

    message = str(info.value)
    assert server.url("/big.bin") in message
    assert "connection dropped after 100000 of 300000 bytes" in message
    assert "kept and the next run resumes it" in message
    assert part.read_bytes() == data[:100_000]
    assert not dest.exists()

    server.cut_at.clear()
    server.requests.clear()
    digest = fetch(server.url("/big.bin"), dest, expected_sha256=sha256(data), **FAST)

    assert server.requests == [{"path": "/big.bin", "range": "bytes=100000-"}]
    assert digest == sha256(data)
    assert dest.read_bytes() == data
    assert not part.exists()
    assert list(dest.parent.iterdir()) == [dest]


def test_connection_drop_is_resumed_within_one_call(server, tmp_path):
    data = random.Random(1).randbytes(200_000)
    server.files["/big.bin"] = data
    server.cut_at["/big.bin"] = 70_000
    server.cut_once = True
    dest = tmp_path / "big.bin"

    digest = fetch(server.url("/big.bin"), dest, retries=1, **FAST)

    assert [r["range"] for r in server.requests] == [None, "bytes=70000-"]
    assert digest == sha256(data)
    assert dest.read_bytes() == data


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    data = random.Random(2).randbytes(50_000)
    server.files["/big.bin"] = data
    server.cut_at["/big.bin"] = 20_000
    dest = tmp_path / "big.bin"
    with pytest.raises(IncompleteDownload):
        fetch(server.url("/big.bin"), dest, retries=1, **FAST)

    server.cut_at.clear()
    server.honor_range = False
    server.requests.clear()
    digest = fetch(server.url("/big.bin"), dest, **FAST)

    assert server.requests[0]["range"] == "bytes=20000-"
    assert digest == sha256(data)
    assert dest.read_bytes() == data


def test_range_not_satisfiable_with_complete_part_finishes_without_body(server, tmp_path):
    data = b"x" * 1000
    server.files["/f.bin"] = data
    server.cut_at["/f.bin"] = 400
    dest = tmp_path / "f.bin"
    with pytest.raises(IncompleteDownload):
        fetch(server.url("/f.bin"), dest, retries=1, **FAST)
    part = dest.with_name("f.bin.part")
    # Simulate a run killed after the last byte arrived but before the rename.
    with open(part, "ab") as handle:
        handle.write(data[400:])
    server.cut_at.clear()
    server.requests.clear()

    assert fetch(server.url("/f.bin"), dest, expected_sha256=sha256(data), **FAST) == sha256(data)
    assert server.requests == [{"path": "/f.bin", "range": "bytes=1000-"}]
    assert dest.read_bytes() == data


def test_range_not_satisfiable_with_longer_part_restarts(server, tmp_path):
    server.files["/f.bin"] = b"y" * 1000
    server.cut_at["/f.bin"] = 400
    dest = tmp_path / "f.bin"
    with pytest.raises(IncompleteDownload):
        fetch(server.url("/f.bin"), dest, retries=1, **FAST)
    server.cut_at.clear()
    server.files["/f.bin"] = b"z" * 300  # the remote file shrank
    server.requests.clear()

    assert fetch(server.url("/f.bin"), dest, **FAST) == sha256(b"z" * 300)
    assert [r["range"] for r in server.requests] == ["bytes=400-", None]
    assert dest.read_bytes() == b"z" * 300


# --------------------------------------------------------------------------------------------
# checksums


def test_checksum_mismatch_names_file_and_digests_and_leaves_nothing(server, dirs):
    server.files["/demo.zip"] = DEMO_ZIP
    wrong = "0" * 64
    entry = {"files": [{"url": server.url("/demo.zip"), "sha256": wrong}]}

    with pytest.raises(ChecksumMismatch) as info:
        download_dataset("demo", entry, **dirs, **FAST)

    message = str(info.value)
    assert "demo.zip" in message
    assert f"expected {wrong}" in message
    assert f"got {sha256(DEMO_ZIP)}" in message
    assert "registry entry" in message
    assert not dirs["dest_dir"].exists()
    assert list((dirs["cache_dir"] / "demo").iterdir()) == []
    assert leftovers(dirs["dest_dir"].parent) == []


def test_trust_on_first_use_records_then_rejects_changed_archive(server, dirs, tmp_path):
    server.files["/demo.zip"] = DEMO_ZIP
    entry = {"files": [{"url": server.url("/demo.zip"), "sha256": None}]}
    download_dataset("demo", entry, **dirs, **FAST)
    record_path = dirs["checksum_dir"] / "demo.json"
    assert json.loads(record_path.read_text()) == {"demo.zip": sha256(DEMO_ZIP)}
    manifest_before = (dirs["dest_dir"] / MANIFEST_NAME).read_text()

    changed = make_zip({"demo/train_imgs.tsv": b"1\tdGFtcGVyZWQ=\n"})
    server.files["/demo.zip"] = changed
    fresh_cache = {**dirs, "cache_dir": tmp_path / "other-cache"}
    with pytest.raises(ChecksumMismatch) as info:
        download_dataset("demo", entry, **fresh_cache, **FAST)

    message = str(info.value)
    assert f"expected {sha256(DEMO_ZIP)}" in message
    assert f"got {sha256(changed)}" in message
    assert str(record_path) in message
    assert "delete its entry" in message
    # The earlier dataset stays exactly as it was, and the record is not rewritten.
    assert (dirs["dest_dir"] / MANIFEST_NAME).read_text() == manifest_before
    assert (dirs["dest_dir"] / "demo" / "train_imgs.tsv").read_bytes() == DEMO_MEMBERS["demo/train_imgs.tsv"]
    assert json.loads(record_path.read_text()) == {"demo.zip": sha256(DEMO_ZIP)}
    assert list((tmp_path / "other-cache" / "demo").iterdir()) == []


def test_verify_or_record_checksum(tmp_path):
    record = tmp_path / "sums" / "ds.json"
    verify_or_record_checksum("a.zip", "AB" * 32, expected=None, record_path=record)
    verify_or_record_checksum("b.zip", "cd" * 32, expected=None, record_path=record)
    assert json.loads(record.read_text()) == {"a.zip": "ab" * 32, "b.zip": "cd" * 32}
    verify_or_record_checksum("a.zip", "ab" * 32, expected=None, record_path=record)

    with pytest.raises(ChecksumMismatch, match=r"a\.zip: sha256 mismatch: expected (ab){32} \(recorded"):
        verify_or_record_checksum("a.zip", "ef" * 32, expected=None, record_path=record)
    with pytest.raises(ChecksumMismatch, match=r"c\.zip: sha256 mismatch: expected (12){32}, got (34){32}"):
        verify_or_record_checksum("c.zip", "34" * 32, expected="12" * 32, record_path=record)
    assert "c.zip" not in json.loads(record.read_text())


def test_sha256_sidecar_local_and_remote(server, tmp_path, dirs):
    source = tmp_path / "sources" / "demo.zip"
    source.parent.mkdir()
    source.write_bytes(DEMO_ZIP)
    sidecar = tmp_path / "sources" / "demo.zip.sha256"
    sidecar.write_text(f"{sha256(DEMO_ZIP)}  demo.zip\n")
    entry = {"files": [{"url": str(source), "sha256_file": str(sidecar)}]}

    download_dataset("demo", entry, **dirs, **FAST)
    assert (dirs["dest_dir"] / "demo" / "train_imgs.tsv").exists()
    assert not (dirs["checksum_dir"] / "demo.json").exists()

    # A multi-entry sidecar in binary-mode notation, fetched over HTTP.
    server.files["/demo.zip"] = DEMO_ZIP
    server.files["/SHA256SUMS"] = f"{'1' * 64}  other.zip\n{sha256(DEMO_ZIP)} *demo.zip\n".encode()
    remote = {"files": [{"url": server.url("/demo.zip"), "sha256_file": server.url("/SHA256SUMS")}]}
    other = {**dirs, "cache_dir": tmp_path / "cache2", "dest_dir": tmp_path / "data" / "remote"}
    download_dataset("demo", remote, **other, **FAST)
    assert (other["dest_dir"] / "demo" / "train_imgs.tsv").exists()

    sidecar.write_text(f"{'f' * 64}  demo.zip\n")
    bad = {**dirs, "cache_dir": tmp_path / "cache3", "dest_dir": tmp_path / "data" / "bad"}
    with pytest.raises(ChecksumMismatch) as info:
        download_dataset("demo", entry, **bad, **FAST)
    assert f"expected {'f' * 64}" in str(info.value)
    assert str(sidecar) in str(info.value)
    assert not bad["dest_dir"].exists()


def test_sidecar_without_an_entry_for_the_file(tmp_path, dirs):
    source = tmp_path / "demo.zip"
    source.write_bytes(DEMO_ZIP)
    sidecar = tmp_path / "SUMS"
    sidecar.write_text(f"{'1' * 64}  a.zip\n{'2' * 64}  b.zip\n")
    entry = {"files": [{"url": str(source), "sha256_file": str(sidecar)}]}
    with pytest.raises(DownloadError, match=r"SUMS has no entry for demo\.zip"):
        download_dataset("demo", entry, **dirs, **FAST)
    assert not dirs["dest_dir"].exists()


# --------------------------------------------------------------------------------------------
# unsafe and corrupt archives


def _tar_member(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


def _zip_symlink(name: str, target: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("ok.txt", b"fine")
        info = zipfile.ZipInfo(name)
        info.create_system = 3
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, target)
    return buffer.getvalue()


UNSAFE_ARCHIVES = {
    "dotdot.zip": (make_zip({"ok.txt": b"fine", "../evil.txt": b"pwned"}), "../evil.txt", "'..'"),
    "absolute.zip": (make_zip({"ok.txt": b"fine", "/tmp/evil.txt": b"pwned"}), "/tmp/evil.txt", "absolute"),
    "backslash.zip": (make_zip({"ok.txt": b"fine", "..\\evil.txt": b"pwned"}), "..\\evil.txt", "'..'"),
    "symlink.zip": (_zip_symlink("link", "../../outside"), "link", "outside the extraction directory"),
    "symlink.tar.gz": (
        make_tar([("data/ok.txt", b"fine"), _tar_member("data/link", tarfile.SYMTYPE, "../../outside")]),
        "data/link",
        "outside the extraction directory",
    ),
    "abs-symlink.tar": (
        make_tar([_tar_member("link", tarfile.SYMTYPE, "/etc/passwd")], mode="w"),
        "link",
        "absolute",
    ),
    "hardlink.tar.bz2": (
        make_tar([("ok.txt", b"fine"), _tar_member("hard", tarfile.LNKTYPE, "../outside")], mode="w:bz2"),
        "hard",
        "outside the extraction directory",
    ),
    "symlink-dir.tar.xz": (
        # Each step looks harmless alone; together they write through a link to the parent.
        make_tar(
            [_tar_member("up", tarfile.SYMTYPE, "."), _tar_member("up/out", tarfile.SYMTYPE, "../escaped")],
            mode="w:xz",
        ),
        "up/out",
        "outside the extraction directory",
    ),
    "dotdot.tar": (
        make_tar([("ok.txt", b"fine"), ("a/../../evil.txt", b"pwned")], mode="w"),
        "a/../../evil.txt",
        "'..'",
    ),
    "fifo.tar": (make_tar([("ok.txt", b"fine"), _tar_member("pipe", tarfile.FIFOTYPE)], mode="w"), "pipe", "fifo"),
    "device.tar": (make_tar([_tar_member("dev", tarfile.CHRTYPE)], mode="w"), "dev", "device"),
}


@pytest.mark.parametrize("archive_name", sorted(UNSAFE_ARCHIVES))
def test_unsafe_archives_are_rejected_and_nothing_is_extracted(tmp_path, archive_name):
    data, member, problem = UNSAFE_ARCHIVES[archive_name]
    archive = tmp_path / archive_name
    archive.write_bytes(data)
    work = tmp_path / "work"
    target = work / "out"

    with pytest.raises(UnsafeArchive) as info:
        safe_extract(archive, target)

    message = str(info.value)
    assert str(archive) in message
    assert f"member {member!r}" in message
    assert problem in message
    assert not target.exists()
    assert list(work.iterdir()) == []
    assert not (tmp_path / "evil.txt").exists()
    assert not (tmp_path / "escaped").exists()


def test_unsafe_archive_through_download_dataset_leaves_no_output(tmp_path, dirs):
    archive = tmp_path / "slip.zip"
    archive.write_bytes(UNSAFE_ARCHIVES["dotdot.zip"][0])
    with pytest.raises(UnsafeArchive, match=r"slip\.zip: member '\.\./evil\.txt'"):
        download_dataset("demo", {"files": [{"url": str(archive)}]}, **dirs, **FAST)
    assert not dirs["dest_dir"].exists()
    assert leftovers(dirs["dest_dir"].parent) == []
    assert not (dirs["dest_dir"].parent / "evil.txt").exists()


def test_safe_extract_keeps_inside_links_and_merges(tmp_path):
    archive = tmp_path / "ok.tar.gz"
    archive.write_bytes(
        make_tar(
            [
                ("pkg/data/a.txt", b"A"),
                _tar_member("pkg/latest", tarfile.SYMTYPE, "data/a.txt"),
                _tar_member("pkg/copy.txt", tarfile.LNKTYPE, "pkg/data/a.txt"),
            ]
        )
    )
    target = tmp_path / "out"
    (target / "pkg").mkdir(parents=True)
    (target / "pkg" / "existing.txt").write_text("kept")

    written = safe_extract(archive, target)

    assert written == [target / "pkg/data/a.txt", target / "pkg/latest", target / "pkg/copy.txt"]
    assert (target / "pkg" / "latest").read_text() == "A"
    assert os.readlink(target / "pkg" / "latest") == "data/a.txt"
    assert (target / "pkg" / "copy.txt").read_text() == "A"
    assert (target / "pkg" / "existing.txt").read_text() == "kept"

    with pytest.raises(DownloadError, match=r"would overwrite .*pkg/data/a\.txt"):
        safe_extract(archive, target)
    assert (target / "pkg" / "data" / "a.txt").read_text() == "A"


@pytest.mark.parametrize(
    "archive_name, data",
    [
        ("garbage.zip", b"this is not a zip file at all" * 10),
        ("truncated.zip", DEMO_ZIP[: len(DEMO_ZIP) // 2]),
        ("truncated.tar.gz", make_tar([("a.bin", random.Random(3).randbytes(50_000))])[:2000]),
        ("garbage.tar", b"\x01" * 700),
    ],
)
def test_corrupt_archive_is_a_clear_error(tmp_path, archive_name, data):
    archive = tmp_path / archive_name
    archive.write_bytes(data)
    work = tmp_path / "work"
    with pytest.raises(CorruptArchive) as info:
        safe_extract(archive, work / "out")
    assert str(archive) in str(info.value)
    assert "corrupt" in str(info.value)
    assert list(work.iterdir()) == []


def test_corrupt_first_download_is_dropped_from_cache(server, dirs):
    server.files["/demo.zip"] = DEMO_ZIP[:100]
    entry = {"files": [{"url": server.url("/demo.zip")}]}
    with pytest.raises(CorruptArchive, match=r"demo\.zip: corrupt or truncated archive.*cached copy was deleted"):
        download_dataset("demo", entry, **dirs, **FAST)
    assert not dirs["dest_dir"].exists()
    assert not (dirs["cache_dir"] / "demo" / "demo.zip").exists()
    assert not (dirs["checksum_dir"] / "demo.json").exists()

    server.files["/demo.zip"] = DEMO_ZIP
    download_dataset("demo", entry, **dirs, **FAST)
    assert json.loads((dirs["checksum_dir"] / "demo.json").read_text()) == {"demo.zip": sha256(DEMO_ZIP)}


# --------------------------------------------------------------------------------------------
# network failures


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_host_after_retries(dirs):
    url = f"http://127.0.0.1:{_closed_port()}/demo.zip"
    started = time.monotonic()
    with pytest.raises(SourceUnreachable) as info:
        download_dataset("demo", {"files": [{"url": url}]}, **dirs, retries=3, **FAST)
    assert time.monotonic() - started < 5
    message = str(info.value)
    assert url in message
    assert "unreachable" in message
    assert "connection refused" in message
    assert "after 3 attempts" in message
    assert not dirs["dest_dir"].exists()
    assert not (dirs["cache_dir"] / "demo" / "demo.zip").exists()


def test_http_404_is_not_retried(server, dirs):
    url = server.url("/missing.zip")
    with pytest.raises(HTTPStatusError) as info:
        download_dataset("demo", {"files": [{"url": url}]}, **dirs, retries=3, **FAST)
    assert info.value.status == 404
    assert str(info.value).startswith(f"{url}: server answered HTTP 404")
    assert len(server.requests) == 1
    assert not dirs["dest_dir"].exists()


def test_http_503_is_retried_then_reported(server, tmp_path):
    server.status["/busy.zip"] = 503
    with pytest.raises(HTTPStatusError, match=r"HTTP 503 .*gave up after 2 attempts"):
        fetch(server.url("/busy.zip"), tmp_path / "busy.zip", retries=2, **FAST)
    assert len(server.requests) == 2
    assert not (tmp_path / "busy.zip").exists()


def test_timeout_is_reported(server, tmp_path):
    server.files["/slow.zip"] = DEMO_ZIP
    server.delay = 0.6
    with pytest.raises(DownloadTimeout, match=r"/slow\.zip: no answer within the 0\.2 s timeout"):
        fetch(server.url("/slow.zip"), tmp_path / "slow.zip", timeout=0.2, retries=1, **FAST)
    assert not (tmp_path / "slow.zip").exists()


# --------------------------------------------------------------------------------------------
# registry entries


@pytest.mark.parametrize(
    "entry, pattern",
    [
        ({}, r"'files' must be a non-empty list"),
        ({"files": [{"sha256": None}]}, r"files\[0\]: 'url' must be a non-empty string"),
        ({"files": [{"url": "a.zip", "sha256sum": "x"}]}, r"unknown key\(s\) sha256sum"),
        ({"files": [{"url": "a.zip", "sha256": "abc"}]}, r"is not a 64-digit hex sha256"),
        ({"files": [{"url": "x/a.zip"}, {"url": "y/a.zip"}]}, r"'a\.zip' is used twice"),
        ({"files": [{"url": "http://host/"}]}, r"set 'filename'"),
        ({"files": [{"url": "a.zip", "extract": "yes"}]}, r"'extract' must be true or false"),
    ],
)
def test_malformed_registry_entries(dirs, entry, pattern):
    with pytest.raises(ConfigError, match=pattern):
        download_dataset("demo", entry, **dirs, **FAST)
    assert not dirs["dest_dir"].exists()


@pytest.mark.parametrize("name", ["", "..", "a/b"])
def test_dataset_name_must_be_a_plain_name(dirs, name):
    with pytest.raises(ConfigError, match=r"dataset name"):
        download_dataset(name, {"files": [{"url": "a.zip"}]}, **dirs, **FAST)
