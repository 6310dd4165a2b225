"""CSV + URL corpora (CLIP-Chinese style) against a real HTTP server on loopback."""

from __future__ import annotations

import base64
import contextlib
import csv
import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from vlretrieval.data import raw
from vlretrieval.data.download import USER_AGENT
from vlretrieval.data.lmdb_store import SplitStore
from vlretrieval.data.url_corpus import (
    DROPPED_NAME,
    REPORT_NAME,
    ImageDownloader,
    assign_splits,
    build_url_corpus,
    judge_image,
    read_csv_rows,
)
from vlretrieval.data.url_corpus.images import _name_key
from vlretrieval.errors import ConfigError, DataError

from .conftest import REPO, make_image

TIMEOUT = 0.5
SLOW = 1.2  # seconds the slow route waits before answering, beyond TIMEOUT


# --------------------------------------------------------------------------------------------
# a loopback image host


class Site:
    """Routes of the test server and what it saw."""

    def __init__(self):
        self.routes: dict[str, tuple] = {}
        self.requests: Counter = Counter()
        self.agents: list[str | None] = []
        self.lock = threading.Lock()
        self.base = ""

    def url(self, path: str) -> str:
        return self.base + path

    def image(self, path: str, data: bytes, content_type: str = "image/jpeg") -> str:
        self.routes[path] = ("body", data, content_type)
        return self.url(path)

    def seen(self) -> dict[str, int]:
        with self.lock:
            return dict(self.requests)


class SiteHandler(BaseHTTPRequestHandler):
    def log_message(self, format, *args):
        pass

    def _body(self, data: bytes, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        site: Site = self.server.site
        path = self.path.split("?", 1)[0]
        with site.lock:
            site.requests[path] += 1
            count = site.requests[path]
            site.agents.append(self.headers.get("User-Agent"))
        route = site.routes.get(path)
        if route is None:
            self.send_error(404)
            return
        kind = route[0]
        if kind == "body":
            self._body(route[1], route[2])
        elif kind == "slow":
            time.sleep(route[1])
            with contextlib.suppress(OSError):  # the client gave up long ago
                self._body(route[2], "image/jpeg")
        elif kind == "redirect":
            self.send_response(302)
            self.send_header("Location", route[1])
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif kind == "flaky":  # 503 for the first route[1] requests, then the image
            if count <= route[1]:
                self.send_error(503)
            else:
                self._body(route[2], "image/jpeg")
        else:
            raise AssertionError(kind)


@pytest.fixture
def site():
    state = Site()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), SiteHandler)
    httpd.daemon_threads = True
    httpd.block_on_close = False
    httpd.site = state
    state.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


def write_csv(path: Path, rows: list[list[str]], header: list[str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header or ["text", "url", "filename"])
        writer.writerows(rows)
    return path


def corrupt_png(seed: int) -> bytes:
    data = bytearray(make_image("PNG", (40, 40), seed))
    data[len(data) // 2] ^= 0xFF  # inside IDAT: the chunk CRC no longer matches
    return bytes(data)


def url_entry(csv_name: str = "corpus.csv", **overrides) -> dict:
    block = {"csv": csv_name, "split_sizes": {"test": 3, "valid": 2}, "min_image_side": 16,
             "threads": 4, "timeout": TIMEOUT, "retries": 2, "backoff": 0.01}
    block.update(overrides)
    return {"format": "url_csv", "splits": ["train", "valid", "test"], "url_corpus": block}


# --------------------------------------------------------------------------------------------
# the full corpus: one of every failure, then resume


GOOD = [f"good{i}.jpg" for i in range(8)]


@pytest.fixture
def corpus(site, tmp_path):
    images = {name: make_image("JPEG", (48, 40), seed) for seed, name in enumerate(GOOD)}
    images["moved.jpg"] = make_image("JPEG", (40, 40), 100)
    images["flaky.jpg"] = make_image("PNG", (40, 32), 101)
    rows = [[f"第{i}张好图", site.image(f"/img/{name}", images[name]), name] for i, name in enumerate(GOOD)]
    rows.insert(1, ["第0张好图的第二条描述", site.url("/img/good0.jpg"), "good0.jpg"])
    site.routes["/img/slow.jpg"] = ("slow", SLOW, make_image("JPEG", (40, 40), 102))
    site.routes["/old/moved.jpg"] = ("redirect", "/img/moved.jpg")
    site.image("/img/moved.jpg", images["moved.jpg"])
    site.routes["/img/flaky.jpg"] = ("flaky", 1, images["flaky.jpg"])
    truncated = make_image("JPEG", (64, 48), 103)
    rows += [
        ["不存在的图", site.url("/img/missing.jpg"), "missing.jpg"],
        ["太慢的图", site.url("/img/slow.jpg"), "slow.jpg"],
        ["损坏的图", site.image("/img/corrupt.png", corrupt_png(104), "image/png"), "corrupt.png"],
        ["截断的图", site.image("/img/truncated.jpg", truncated[: len(truncated) // 2]), "truncated.jpg"],
        ["动图", site.image("/img/anim.gif", make_image("GIF", (40, 40), 105), "image/gif"), "anim.gif"],
        ["错误页", site.image("/img/page.jpg", b"<!DOCTYPE html><html><body>gone</body></html>", "text/html"),
         "page.jpg"],
        ["太小的图", site.image("/img/tiny.jpg", make_image("JPEG", (8, 8), 106)), "tiny.jpg"],
        ["跳转的图", site.url("/old/moved.jpg"), "moved.jpg"],
        ["偶尔失败的图", site.url("/img/flaky.jpg"), "flaky.jpg"],
    ]
    source = tmp_path / "download"
    write_csv(source / "corpus.csv", rows)
    return {"source": source, "rows": rows, "images": images, "cache": tmp_path / "cache", "out": tmp_path / "raw"}


DROPPED_BY_NAME = {
    "missing.jpg": "download_failed",
    "slow.jpg": "download_failed",
    "corrupt.png": "corrupt",
    "truncated.jpg": "truncated",
    "anim.gif": "gif",
    "page.jpg": "not_image",
    "tiny.jpg": "too_small",
}


def read_dropped(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / DROPPED_NAME).read_text(encoding="utf-8").splitlines()]


def read_split(out: Path, split: str) -> tuple[dict[int, bytes], list[dict]]:
    images = {int(line.image_id): base64.b64decode(line.payload)
              for line in raw.iter_image_lines(raw.images_tsv_path(out, split))}
    texts = [line.obj for line in raw.iter_text_lines(raw.texts_jsonl_path(out, split))]
    return images, texts


def test_download_filter_and_convert(site, corpus):
    report = build_url_corpus(url_entry(), corpus["source"], corpus["out"], cache_dir=corpus["cache"])

    # Every dropped row is listed, in CSV order, with its line and reason.
    dropped = read_dropped(corpus["out"])
    names = [name for _text, _url, name in corpus["rows"]]
    assert [d["filename"] for d in dropped] == [n for n in names if n in DROPPED_BY_NAME]
    assert {d["filename"]: d["category"] for d in dropped} == DROPPED_BY_NAME
    assert all(d["line"] == names.index(d["filename"]) + 2 for d in dropped)  # header is line 1
    assert all(d["url"] == corpus["rows"][names.index(d["filename"])][1] for d in dropped)
    reasons = {d["filename"]: d["reason"] for d in dropped}
    assert "HTTP 404" in reasons["missing.jpg"]
    assert f"no answer within the {TIMEOUT:g} s timeout" in reasons["slow.jpg"]
    assert "gave up after 2 attempts" in reasons["slow.jpg"]
    assert "HTML page" in reasons["page.jpg"]
    assert "8x8, smaller than the minimum side of 16" in reasons["tiny.jpg"]
    assert "truncated" in reasons["truncated.jpg"]

    # Retries: the 503 once and the timeout twice; the 404 and the others only once.
    seen = site.seen()
    assert seen["/img/flaky.jpg"] == 2
    assert seen["/img/slow.jpg"] == 2
    assert seen["/img/missing.jpg"] == 1
    assert seen["/old/moved.jpg"] == 1 and seen["/img/moved.jpg"] == 1
    assert seen["/img/good0.jpg"] == 1  # two captions, one image, one request
    assert set(site.agents) == {USER_AGENT}

    kept = set(GOOD) | {"moved.jpg", "flaky.jpg"}
    assert sorted(p.name for p in (corpus["cache"] / "images").iterdir()) == sorted(kept)
    assert list((corpus["cache"] / "partial").iterdir()) == []

    # The raw layout: image ids are positions among distinct file names, text ids row indices.
    image_id = {name: i for i, name in enumerate(dict.fromkeys(names))}
    all_images, all_texts = {}, []
    for split in ("train", "valid", "test"):
        images, texts = read_split(corpus["out"], split)
        assert set(images).isdisjoint(all_images)
        all_images.update(images)
        all_texts += texts
        assert {i for t in texts for i in t["image_ids"]} == set(images)
        assert report["splits"][split]["images"] == len(images)
        assert report["splits"][split]["texts"] == len(texts)
    assert all_images == {image_id[name]: corpus["images"][name] for name in kept}
    expected_texts = [
        {"text_id": row, "text": text, "image_ids": [image_id[name]]}
        for row, (text, _url, name) in enumerate(corpus["rows"]) if name in kept
    ]
    assert sorted(all_texts, key=lambda t: t["text_id"]) == expected_texts
    good0 = [t for t in all_texts if t["image_ids"] == [image_id["good0.jpg"]]]
    assert [t["text"] for t in good0] == ["第0张好图", "第0张好图的第二条描述"]

    # Splits: every file name of the CSV ranked by its hash, test and valid first; a dropped image
    # leaves a gap in its split and is listed with it.
    expected_split = dict(zip(image_id, assign_splits(list(image_id), ["train", "valid", "test"],
                                                      {"test": 3, "valid": 2})))
    for split in ("train", "valid", "test"):
        images, _texts = read_split(corpus["out"], split)
        assert {name for name, i in image_id.items() if i in images} == {
            name for name in kept if expected_split[name] == split
        }
    assert {d["filename"]: d["split"] for d in dropped} == {name: expected_split[name] for name in DROPPED_BY_NAME}
    assert {s: (v["requested"], v["images"], v["missing_images"]) for s, v in report["splits"].items()} == {
        split: (requested,
                sum(1 for name in kept if expected_split[name] == split),
                sum(1 for name in DROPPED_BY_NAME if expected_split[name] == split))
        for split, requested in (("train", None), ("valid", 2), ("test", 3))
    }
    assert report["splits"]["test"]["images"] + report["splits"]["test"]["missing_images"] == 3

    assert report["rows"] == {"read": 18, "kept": 11, "dropped": 7, "unassigned": 0,
                              "dropped_by_category": {"download_failed": 2, "gif": 1, "not_image": 1, "corrupt": 1,
                                                      "truncated": 1, "too_small": 1}}
    assert report["images"]["distinct"] == 17
    assert report["images"]["kept"] == 10
    assert report["images"]["fetched"] == 17
    assert json.loads((corpus["out"] / REPORT_NAME).read_text(encoding="utf-8")) == report


def test_rerun_resumes_from_cache_and_refetches_damaged_files(site, corpus):
    entry = url_entry()
    first = build_url_corpus(entry, corpus["source"], corpus["out"], cache_dir=corpus["cache"])
    before = site.seen()

    second = build_url_corpus(entry, corpus["source"], corpus["out"], cache_dir=corpus["cache"])

    after = site.seen()
    # Only the transient failure is asked again; kept images and permanent rejections are not.
    assert {path: after[path] - before.get(path, 0) for path in after if after[path] != before.get(path, 0)} == {
        "/img/slow.jpg": 2
    }
    assert second["images"]["from_cache"] == 10
    assert second["images"]["from_rejected_cache"] == 6
    assert second["images"]["fetched"] == 1
    assert second["splits"] == first["splits"]
    assert {k: v for k, v in second["rows"].items()} == first["rows"]

    # A damaged cached file is fetched again; the result is the same dataset.
    cached = corpus["cache"] / "images" / "good3.jpg"
    cached.write_bytes(cached.read_bytes()[:200])
    before = site.seen()
    third = build_url_corpus(entry, corpus["source"], corpus["out"], cache_dir=corpus["cache"])
    after = site.seen()
    assert after["/img/good3.jpg"] - before["/img/good3.jpg"] == 1
    assert after["/img/good1.jpg"] == before["/img/good1.jpg"]
    assert cached.read_bytes() == corpus["images"]["good3.jpg"]
    assert third["images"]["from_cache"] == 9
    assert third["splits"] == first["splits"]


def test_rejection_memory_follows_the_settings(site, corpus):
    build_url_corpus(url_entry(), corpus["source"], corpus["out"], cache_dir=corpus["cache"])
    before = site.seen()

    # A lower minimum side and GIFs allowed: those two are asked again, and now kept.
    report = build_url_corpus(url_entry(min_image_side=4, drop_gif=False), corpus["source"], corpus["out"],
                              cache_dir=corpus["cache"])

    after = site.seen()
    assert after["/img/tiny.jpg"] - before["/img/tiny.jpg"] == 1
    assert after["/img/anim.gif"] - before["/img/anim.gif"] == 1
    assert after["/img/page.jpg"] == before["/img/page.jpg"]
    assert report["images"]["kept"] == 12
    assert {d["filename"] for d in read_dropped(corpus["out"])} == {
        "missing.jpg", "slow.jpg", "corrupt.png", "truncated.jpg", "page.jpg"
    }

    # A stricter minimum side rejects cached images without asking the server or deleting them.
    before = site.seen()
    report = build_url_corpus(url_entry(min_image_side=40, drop_gif=False), corpus["source"], corpus["out"],
                              cache_dir=corpus["cache"])
    after = site.seen()
    assert {p: after[p] - before.get(p, 0) for p in after if after[p] != before.get(p, 0)} == {"/img/slow.jpg": 2}
    assert report["images"]["kept"] == 10  # good*.jpg 48x40, moved.jpg and the GIF 40x40
    too_small = {d["filename"] for d in read_dropped(corpus["out"]) if d["category"] == "too_small"}
    assert too_small == {"flaky.jpg", "tiny.jpg"}  # 40x32 and 8x8
    assert (corpus["cache"] / "images" / "flaky.jpg").exists()


def test_killed_transfer_leaves_no_file_that_looks_valid(site, tmp_path):
    data = make_image("JPEG", (48, 48), 7)
    url = site.image("/img/a.jpg", data)
    downloader = ImageDownloader(tmp_path / "cache", min_side=16, timeout=TIMEOUT, retries=1, backoff=0)
    # What a kill during a transfer leaves: a partial file under a temporary name.
    (downloader.partial_dir / f"{_name_key('a.jpg')}.part").write_bytes(data[:100])
    assert not (downloader.images_dir / "a.jpg").exists()

    outcome = downloader.obtain("a.jpg", url)

    assert outcome.kept and outcome.source == "download"
    assert (downloader.images_dir / "a.jpg").read_bytes() == data
    assert list(downloader.partial_dir.iterdir()) == []


def test_url_with_spaces_and_non_ascii_is_escaped(site, tmp_path):
    data = make_image("JPEG", (32, 32), 9)
    site.image("/img/%E7%8C%AB%20%E5%9B%BE.jpg", data)  # the path as a browser would send it
    downloader = ImageDownloader(tmp_path / "cache", min_side=16, timeout=TIMEOUT, retries=1)

    outcome = downloader.obtain("cat.jpg", site.url("/img/猫 图.jpg?w=1"))

    assert outcome.kept, outcome.rejection
    assert site.seen() == {"/img/%E7%8C%AB%20%E5%9B%BE.jpg": 1}


# --------------------------------------------------------------------------------------------
# CSV rows


def test_bad_rows_are_dropped_and_reported_under_skip(site, tmp_path):
    good = {f"g{i}.jpg": make_image("JPEG", (32, 32), 200 + i) for i in range(3)}
    urls = {name: site.image(f"/img/{name}", data) for name, data in good.items()}
    lines = [
        "text,url,filename",
        f"一,{urls['g0.jpg']},g0.jpg",
        f"少了一列,{urls['g1.jpg']}",
        f",{urls['g1.jpg']},g1.jpg",
        "不是网址,ftp://example.org/a.jpg,a.jpg",
        f"路径,{urls['g1.jpg']},../g1.jpg",
        f"二,{urls['g1.jpg']},g1.jpg",
        f"三,{urls['g2.jpg']},g1.jpg",
        f"一,{urls['g0.jpg']},g0.jpg",
        "",
        f'"四\n跨行",{urls["g2.jpg"]},g2.jpg',
    ]
    source = tmp_path / "download"
    source.mkdir()
    (source / "corpus.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    entry = {"format": "url_csv", "splits": ["test"], "url_corpus": {"csv": "corpus.csv", "min_image_side": 16,
                                                                     "timeout": TIMEOUT, "backoff": 0.01}}

    report = build_url_corpus(entry, source, tmp_path / "raw", cache_dir=tmp_path / "cache", policy="skip")

    dropped = read_dropped(tmp_path / "raw")
    assert [(d["line"], d["category"]) for d in dropped] == [
        (3, "bad_row"), (4, "bad_row"), (5, "bad_row"), (6, "bad_row"), (8, "filename_conflict"), (9, "duplicate_row"),
    ]
    assert "expected 3 fields like the header, found 2" in dropped[0]["reason"]
    assert dropped[1]["reason"] == "text is empty"
    assert "is not an http(s) URL" in dropped[2]["reason"]
    assert "not a plain file name" in dropped[3]["reason"]
    assert "another url on line 7" in dropped[4]["reason"]
    assert dropped[5]["reason"] == "repeats line 2 (same text and filename)"
    images, texts = read_split(tmp_path / "raw", "test")
    # Ids are CSV positions: rows 0, 5 and 9 (the blank line is not a row); images 0, 1, 2.
    assert texts == [
        {"text_id": 0, "text": "一", "image_ids": [0]},
        {"text_id": 5, "text": "二", "image_ids": [1]},
        {"text_id": 8, "text": "四 跨行", "image_ids": [2]},
    ]
    assert images == {0: good["g0.jpg"], 1: good["g1.jpg"], 2: good["g2.jpg"]}
    assert report["rows"]["dropped_by_category"] == {"bad_row": 4, "duplicate_row": 1, "filename_conflict": 1}


def test_bad_row_stops_the_build_under_error(site, tmp_path):
    source = tmp_path / "download"
    write_csv(source / "corpus.csv", [["一", site.url("/a.jpg"), "a.jpg"], ["二", "not a url", "b.jpg"]])
    out = tmp_path / "raw"
    with pytest.raises(DataError) as info:
        build_url_corpus(url_entry(), source, out, cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert message.startswith(f"{source / 'corpus.csv'}:3 (filename='b.jpg'): url 'not a url' is not an http(s) URL")
    assert "data.on_bad_record: skip" in message
    assert site.seen() == {}  # the CSV is checked before any request
    assert not out.exists()


@pytest.mark.parametrize(
    "content, pattern",
    [
        (b"", r"corpus\.csv: the CSV is empty; expected the header text,url,filename"),
        (b"caption,url,filename\n", r"corpus\.csv:1: header must name the columns text,url,filename \(missing text\)"),
        (b"text,url,url,filename\n", r"corpus\.csv:1: header names the column\(s\) url more than once"),
        (b"text,url,filename\n", r"corpus\.csv: the CSV has a header but no data rows"),
        ("text,url,filename\n一,http://h/a.jpg,a.jpg\n".encode() + b"\xff\xfe,http://h/b.jpg,b.jpg\n",
         r"corpus\.csv:3: not valid UTF-8"),
        (b'text,url,filename\n"unterminated\0,http://h/a.jpg,a.jpg\n', r"corpus\.csv:2: not readable as CSV"),
    ],
)
def test_unreadable_csv_is_a_clear_error(tmp_path, content, pattern):
    source = tmp_path / "download"
    source.mkdir()
    (source / "corpus.csv").write_bytes(content)
    with pytest.raises(DataError, match=pattern):
        build_url_corpus(url_entry(), source, tmp_path / "raw", cache_dir=tmp_path / "cache", policy="skip")
    assert not (tmp_path / "raw").exists()


def test_csv_header_may_reorder_columns_and_carry_extras(tmp_path):
    path = write_csv(tmp_path / "c.csv", [["b.jpg", "x", " 红色\r\n的花 ", "http://h/b.jpg"]],
                     header=["Filename", "source", "TEXT", "url"])
    rows = list(read_csv_rows(path))
    assert [(r.index, r.line, r.text, r.url, r.filename, r.problem) for r in rows] == [
        (0, 2, "红色 的花", "http://h/b.jpg", "b.jpg", None)
    ]


def test_missing_csv_and_bad_settings(tmp_path):
    (tmp_path / "download").mkdir()
    with pytest.raises(DataError, match=r"nope\.csv: CSV file not found"):
        build_url_corpus(url_entry("nope.csv"), tmp_path / "download", tmp_path / "raw", cache_dir=tmp_path / "c")
    with pytest.raises(ConfigError, match=r"all but one of the splits .* train, valid have none"):
        build_url_corpus({**url_entry(), "url_corpus": {"csv": "a.csv", "split_sizes": {"test": 1}}},
                         tmp_path / "download", tmp_path / "raw", cache_dir=tmp_path / "c")
    with pytest.raises(ConfigError, match=r"url_corpus.threads must be a positive integer"):
        build_url_corpus(url_entry(threads=0), tmp_path / "download", tmp_path / "raw", cache_dir=tmp_path / "c")
    with pytest.raises(ConfigError, match=r"needs a url_corpus mapping"):
        build_url_corpus({"format": "url_csv", "splits": ["test"]}, tmp_path / "download", tmp_path / "raw",
                         cache_dir=tmp_path / "c")


def _membership(out: Path) -> dict[int, str]:
    """image id -> split, over the images the build wrote."""
    return {image_id: split for split in ("train", "valid", "test") for image_id in read_split(out, split)[0]}


def test_split_membership_follows_from_the_csv_alone(site, tmp_path):
    names = [f"photo{i:02d}.jpg" for i in range(30)]
    images = {name: make_image("JPEG", (20, 20), 200 + i) for i, name in enumerate(names)}
    source = tmp_path / "download"
    write_csv(source / "corpus.csv", [[f"第{i}张", site.url(f"/img/{name}"), name] for i, name in enumerate(names)])
    sizes = {"test": 6, "valid": 4}
    entry = url_entry(split_sizes=sizes)
    reference = dict(zip(names, assign_splits(names, ["train", "valid", "test"], sizes)))
    by_split = {split: [name for name in names if reference[name] == split] for split in ("test", "valid", "train")}
    # Two runs that lose different images, among them held-out ones that a ranking of only the
    # images that arrived would refill from the next split.
    failing = {
        "first": {*by_split["test"][:2], by_split["valid"][0], by_split["train"][0]},
        "second": {by_split["test"][2], *by_split["valid"][1:3], *by_split["train"][1:3]},
    }
    assert not failing["first"] & failing["second"]

    memberships, reports = {}, {}
    for run in ("first", "second", "none"):
        site.routes.clear()
        for name in names:
            if name not in failing.get(run, ()):
                site.image(f"/img/{name}", images[name])
        out = tmp_path / f"raw_{run}"
        reports[run] = build_url_corpus(entry, source, out, cache_dir=tmp_path / f"cache_{run}")
        memberships[run] = _membership(out)
        # Every failed image is reported, named, with its reason and the split it is missing from.
        dropped = read_dropped(out)
        assert {d["filename"]: (d["split"], d["category"]) for d in dropped} == {
            name: (reference[name], "download_failed") for name in failing.get(run, ())}
        assert all("HTTP 404" in d["reason"] for d in dropped)
        for split in ("test", "valid", "train"):
            lost = sum(1 for name in failing.get(run, ()) if reference[name] == split)
            assert reports[run]["splits"][split]["missing_images"] == lost
            assert reports[run]["splits"][split]["images"] == len(by_split[split]) - lost

    # Image ids are CSV positions, so the same id is the same image in every run.
    expected = {names.index(name): split for name, split in reference.items()}
    assert memberships["none"] == expected
    for run in ("first", "second"):
        assert memberships[run] == {i: split for i, split in expected.items() if names[i] not in failing[run]}
    both = memberships["first"].keys() & memberships["second"].keys()
    assert len(both) == len(names) - 9
    assert {i: memberships["first"][i] for i in both} == {i: memberships["second"][i] for i in both}


def test_every_image_dropped_is_an_error_naming_the_split(site, tmp_path):
    source = tmp_path / "download"
    write_csv(source / "corpus.csv", [["一", site.url("/gone.jpg"), "gone.jpg"]])
    entry = {"format": "url_csv", "splits": ["test"], "url_corpus": {"csv": "corpus.csv", "timeout": TIMEOUT}}
    with pytest.raises(DataError, match=r"no image is left for the split\(s\) test \(0 of 1 images passed"):
        build_url_corpus(entry, source, tmp_path / "raw", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "raw").exists()


# --------------------------------------------------------------------------------------------
# units


def test_assign_splits_is_stable_and_exact():
    names = [f"img{i}.jpg" for i in range(100)]
    splits = assign_splits(names, ["train", "valid", "test"], {"valid": 10, "test": 20})
    assert Counter(splits) == {"train": 70, "valid": 10, "test": 20}
    # Independent of order, and dropping a name moves no other name.
    reordered = dict(zip(reversed(names), assign_splits(list(reversed(names)), ["test", "train", "valid"],
                                                        {"valid": 10, "test": 20})))
    assert reordered == dict(zip(names, splits))
    fewer = dict(zip(names[1:], assign_splits(names[1:], ["train", "valid", "test"], {"valid": 10, "test": 20})))
    moved = [n for n in names[1:] if fewer[n] != dict(zip(names, splits))[n]]
    assert len(moved) <= 2  # at most the boundary names shift up when one ahead of them leaves
    salted = assign_splits(names, ["train", "valid", "test"], {"valid": 10, "test": 20}, salt="other")
    assert salted != splits and Counter(salted) == Counter(splits)
    # All sizes given: the rest is left out; None names stay None.
    assert assign_splits(["a", None, "b", "c"], ["test"], {"test": 2}).count("test") == 2
    assert assign_splits(["a", None], ["test"], {})[1] is None
    with pytest.raises(ConfigError, match=r"names 'valid', which is not one of the splits"):
        assign_splits(names, ["test"], {"valid": 1})


def test_judge_image_categories():
    jpeg = make_image("JPEG", (40, 30), 1)
    assert judge_image(jpeg, min_side=16) is None
    assert judge_image(jpeg, min_side=31).category == "too_small"
    assert judge_image(jpeg, min_side=16, max_bytes=100).category == "too_large"
    assert judge_image(jpeg[: len(jpeg) // 2], min_side=16).category == "truncated"
    assert judge_image(corrupt_png(2), min_side=16).category == "corrupt"
    assert judge_image(make_image("GIF", (40, 40), 3), min_side=16).category == "gif"
    assert judge_image(make_image("GIF", (40, 40), 3), min_side=16, drop_gif=False) is None
    assert judge_image(b"<html><body>404</body></html>", min_side=16).reason == (
        "the server sent an HTML page, not an image"
    )
    assert judge_image(b"", min_side=16).category == "not_image"
    assert judge_image(b"%!PS-Adobe-3.0 EPSF-3.0\n", min_side=16).category == "not_image"


# --------------------------------------------------------------------------------------------
# the workflow


def test_registry_entry_plans_the_whole_dag(workflow):
    # The registry's own entry, with the CSV at its default location.
    csv_path = workflow.workdir / "data" / "clip_chinese_140w.csv"
    write_csv(csv_path, [["一只猫", "https://example.org/cat.jpg", "cat.jpg"]])
    proc = workflow.run("results/clip_chinese_140w/ernie_vil/", "-n", "--quiet", "rules")
    counts = {}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and parts[0] != "total":
            counts[parts[0]] = int(parts[1])
    # The data jobs exactly; the model side (whatever the model registry adds) down to the score.
    assert {rule: counts.get(rule) for rule in ("download", "fetch_url_corpus", "serialize")} == {
        "download": 1, "fetch_url_corpus": 1, "serialize": 2,
    }
    assert counts.get("finetune") == 1 and counts.get("score") == 1 and counts.get("extract_features") == 2
    entry = yaml.safe_load((REPO / "config" / "datasets.yaml").read_text(encoding="utf-8"))["clip_chinese_140w"]
    assert entry["files"][0]["url"] == "data/clip_chinese_140w.csv"


def test_workflow_from_csv_to_lmdb(site, workflow, tmp_path):
    images = {f"p{i}.jpg": make_image("JPEG", (40, 40), 300 + i) for i in range(6)}
    rows = [[f"第{i}张图", site.image(f"/img/{name}", data), name] for i, (name, data) in enumerate(images.items())]
    rows += [["丢失的图", site.url("/img/lost.jpg"), "lost.jpg"], ["第0张图的另一条描述", rows[0][1], "p0.jpg"]]
    csv_path = write_csv(tmp_path / "corpus.csv", rows)
    entry = {
        "description": "loopback url corpus",
        "language": "zh",
        "format": "url_csv",
        "splits": ["train", "test"],
        "eval_split": "test",
        "url_corpus": {"csv": "urls.csv", "split_sizes": {"test": 3}, "min_image_side": 16, "threads": 4,
                       "timeout": TIMEOUT, "backoff": 0.01},
        "files": [{"url": str(csv_path), "filename": "urls.csv"}],
    }
    workflow.write_config({"grid": {"datasets": ["urls_tiny"], "models": ["ernie_vil"]}},
                          datasets={"urls_tiny": entry})

    workflow.run("resources/urls_tiny/lmdb/test", "resources/urls_tiny/lmdb/train")

    root = workflow.workdir / "resources" / "urls_tiny"
    report = json.loads((root / "raw" / REPORT_NAME).read_text(encoding="utf-8"))
    assert report["rows"]["dropped_by_category"] == {"download_failed": 1}
    assert sorted(p.name for p in (workflow.workdir / "resources" / "image_cache" / "urls_tiny" / "images").iterdir()) \
        == sorted(images)
    seen_images = set()
    for split in ("test", "train"):
        with SplitStore(root / "lmdb" / split) as store:
            assert store.num_images == report["splits"][split]["images"]
            assert store.num_texts == report["splits"][split]["texts"]
            for image_id in store.image_ids():
                name = f"p{image_id}.jpg"
                assert store.image_bytes(image_id) == images[name]
                seen_images.add(name)
    assert report["splits"]["test"]["images"] == 3
    assert seen_images == set(images)

    # The image step is up to date now; asking again plans nothing and fetches nothing.
    requests = site.seen()
    proc = workflow.run("resources/urls_tiny/lmdb/test", "-n")
    assert "Nothing to be done" in proc.stdout + proc.stderr
    assert site.seen() == requests
