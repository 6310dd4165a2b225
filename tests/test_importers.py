"""Source importers: COCO-CN .data files and reference (Chinese-CLIP) LMDB splits."""

from __future__ import annotations

import base64
import os
import pickle
from collections import OrderedDict
from pathlib import Path

import lmdb
import pytest

from vlretrieval.data.importers import (
    SOURCE_FORMATS,
    ForbiddenPickleError,
    load_reference_pair,
    read_source,
)
from vlretrieval.data.lmdb_store import PairRecord, SplitStore, TextRecord, serialize_split
from vlretrieval.errors import ConfigError, DataError

from .conftest import make_image


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# --------------------------------------------------------------------------------------------
# COCO-CN

COCO_ENTRY = {"split_files": {"test": "test.coco_cn.data"}}
COCO_IMAGES = {391895: make_image("JPEG", (20, 16), 1), 522418: make_image("PNG", (18, 18), 2),
               184613: make_image("JPEG", (16, 24), 3)}
# Caption lines in file order: (caption, image id). Images repeat and interleave.
COCO_LINES = [("一个人骑着摩托车", 391895), ("摩托车停在路边", 391895), ("厨房里的女人", 522418),
              ("骑车的人\t戴着头盔", 391895), ("小孩和牛", 184613), ("切蛋糕的女人", 522418)]


def write_coco(path: Path, lines=COCO_LINES, images=COCO_IMAGES, overrides: dict[int, str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for line_no, (caption, image_id) in enumerate(lines, start=1):
            if overrides and line_no in overrides:
                handle.write(overrides[line_no] + "\n")
            else:
                handle.write(f"{caption}\t{image_id}\t{b64(images[image_id])}\n")


def test_coco_cn_import_deduplicates_images_and_numbers_texts(tmp_path: Path) -> None:
    write_coco(tmp_path / "src" / "test.coco_cn.data")
    out_dir = tmp_path / "out"
    report = serialize_split("coco_cn_data", tmp_path / "src", "test", out_dir, entry=COCO_ENTRY, progress=False)

    assert (report.images_read, report.images_kept, report.texts_kept, report.pairs) == (3, 3, 6, 6)
    with SplitStore(out_dir) as store:
        assert store.image_ids() == [391895, 522418, 184613]  # order of first appearance
        for image_id, data in COCO_IMAGES.items():
            assert store.image_bytes(image_id) == data
        expected = [TextRecord(i, caption, (image_id,)) for i, (caption, image_id) in enumerate(COCO_LINES)]
        assert store.texts() == expected
        assert store.pair(3) == PairRecord(391895, 3, "骑车的人\t戴着头盔")  # a tab inside a caption survives


def test_coco_cn_conflicting_duplicate_image(tmp_path: Path) -> None:
    other = make_image("JPEG", (20, 16), 99)
    write_coco(tmp_path / "src" / "test.coco_cn.data", overrides={4: f"骑车的人\t391895\t{b64(other)}"})

    with pytest.raises(DataError) as info:
        serialize_split("coco_cn_data", tmp_path / "src", "test", tmp_path / "out", entry=COCO_ENTRY, progress=False)
    message = str(info.value)
    assert "test.coco_cn.data:4" in message and "image_id=391895" in message
    assert "different bytes (first at line 1)" in message
    assert not (tmp_path / "out").exists()

    report = serialize_split("coco_cn_data", tmp_path / "src", "test", tmp_path / "out", entry=COCO_ENTRY,
                             on_bad_record="skip", progress=False)
    assert [(s.kind, s.line, s.id) for s in report.skipped] == [("image", 4, 391895), ("text", 4, 3)]
    assert "does not describe the kept image" in report.skipped[1].reason
    with SplitStore(tmp_path / "out") as store:
        assert store.image_bytes(391895) == COCO_IMAGES[391895]  # the first occurrence is kept
        assert [t.text_id for t in store.texts()] == [0, 1, 2, 4, 5]


def _respell(encoded: str) -> str:
    """Another base64 spelling of the same bytes: set the unused low bits of the last symbol."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    body = encoded.rstrip("=")
    padding = len(encoded) - len(body)
    assert padding, "needs a payload whose length is not a multiple of 3"
    unused = 0b1111 if padding == 2 else 0b11
    return body[:-1] + alphabet[alphabet.index(body[-1]) | unused] + "=" * padding


def test_coco_cn_same_image_spelt_differently_is_not_a_conflict(tmp_path: Path) -> None:
    data = COCO_IMAGES[522418] + b"\0" * ((1 - len(COCO_IMAGES[522418])) % 3)  # force padding
    images = {**COCO_IMAGES, 522418: data}
    respelt = _respell(b64(data))
    assert respelt != b64(data) and base64.b64decode(respelt) == data
    write_coco(tmp_path / "src" / "test.coco_cn.data", images=images,
               overrides={6: f"切蛋糕的女人\t522418\t{respelt}"})
    report = serialize_split("coco_cn_data", tmp_path / "src", "test", tmp_path / "out", entry=COCO_ENTRY,
                             progress=False)
    assert report.images_kept == 3 and report.skipped == []
    with SplitStore(tmp_path / "out") as store:
        assert store.image_bytes(522418) == data


def test_coco_cn_malformed_line(tmp_path: Path) -> None:
    write_coco(tmp_path / "src" / "test.coco_cn.data", overrides={2: "只有文字\t391895"})
    with pytest.raises(DataError, match=r"test\.coco_cn\.data:2: expected 3 tab-separated fields"):
        serialize_split("coco_cn_data", tmp_path / "src", "test", tmp_path / "out", entry=COCO_ENTRY, progress=False)
    report = serialize_split("coco_cn_data", tmp_path / "src", "test", tmp_path / "out", entry=COCO_ENTRY,
                             on_bad_record="skip", progress=False)
    assert [(s.kind, s.line) for s in report.skipped] == [("text", 2)]
    with SplitStore(tmp_path / "out") as store:
        # Text ids stay the running line index, so later captions keep their ids.
        assert [t.text_id for t in store.texts()] == [0, 2, 3, 4, 5]


def test_coco_cn_needs_split_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="split_files.valid"):
        read_source("coco_cn_data", tmp_path, "valid", COCO_ENTRY)
    with pytest.raises(DataError, match="file not found"):
        read_source("coco_cn_data", tmp_path, "test", COCO_ENTRY)


# --------------------------------------------------------------------------------------------
# reference LMDB

REF_ENTRY = {"root": "Flickr30k-CN"}
REF_IMAGES = {2: make_image("JPEG", (16, 16), 11), 10: make_image("PNG", (17, 15), 12),
              7: make_image("JPEG", (30, 20), 13)}
# Texts as the reference jsonl would hold them; text 101 names two images.
REF_TEXTS = [(100, "两只狗在草地上奔跑", [2]), (101, "一群人", [10, 7]), (102, "红色的车", [7]), (103, "狗", [2])]


def write_reference_lmdb(source_dir: Path, split: str = "test", *, pairs: list[bytes] | None = None,
                         images: dict[int, bytes] = REF_IMAGES, num_images: int | None = None) -> Path:
    """Lay out an LMDB split the way the reference build_lmdb_dataset.py does."""
    lmdb_dir = source_dir / REF_ENTRY["root"] / "lmdb" / split
    if pairs is None:
        pairs = [pickle.dumps((image_id, text_id, text)) for text_id, text, ids in REF_TEXTS for image_id in ids]
    for name in ("imgs", "pairs"):
        (lmdb_dir / name).mkdir(parents=True, exist_ok=True)
    env = lmdb.open(str(lmdb_dir / "pairs"), map_size=16 << 20)
    with env.begin(write=True) as txn:
        for index, value in enumerate(pairs):
            txn.put(str(index).encode("utf-8"), value)
        txn.put(b"num_samples", str(len(pairs)).encode("utf-8"))
    env.close()
    env = lmdb.open(str(lmdb_dir / "imgs"), map_size=16 << 20)
    with env.begin(write=True) as txn:
        for image_id, data in images.items():
            txn.put(str(image_id).encode("utf-8"), b64(data).encode("utf-8"))
        txn.put(b"num_images", str(len(images) if num_images is None else num_images).encode("utf-8"))
    env.close()
    return lmdb_dir


def test_reference_lmdb_import_values(tmp_path: Path) -> None:
    write_reference_lmdb(tmp_path / "src")
    out_dir = tmp_path / "out"
    report = serialize_split("reference_lmdb", tmp_path / "src", "test", out_dir, entry=REF_ENTRY, progress=False)
    assert (report.images_kept, report.texts_kept, report.pairs) == (3, 4, 5)
    with SplitStore(out_dir) as store:
        assert store.image_ids() == [2, 7, 10]  # numeric, not LMDB byte order ("10" < "2")
        for image_id, data in REF_IMAGES.items():
            assert store.image_bytes(image_id) == data  # raw bytes, no base64 left
        assert store.texts() == [TextRecord(t, text, tuple(ids)) for t, text, ids in REF_TEXTS]
        assert [store.pair(i) for i in range(store.num_pairs)] == [
            PairRecord(i, t, text) for t, text, ids in REF_TEXTS for i in ids]
    skipped_keys = report.to_dict()["skipped"]
    assert skipped_keys == []


class _Marker:
    """Would create a file when unpickled, through a class instance's __setstate__."""

    def __init__(self, path: str):
        self.path = path

    def __setstate__(self, state: dict) -> None:
        Path(state["path"]).write_text("executed")


def _malicious_pickles(marker: Path) -> dict[str, bytes]:
    class SystemCall:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    class EvalCall:
        def __reduce__(self):
            return (eval, (f"open({str(marker)!r}, 'w').write('x')",))

    return {
        "os.system": pickle.dumps((2, 100, SystemCall())),
        "builtins.eval": pickle.dumps(EvalCall()),
        "class instance": pickle.dumps((2, 100, _Marker(str(marker)))),
        "ordered dict": pickle.dumps((2, 100, OrderedDict(a=1))),
        "protocol 0 global": pickle.dumps((2, 100, SystemCall()), protocol=0),
    }


@pytest.mark.parametrize("policy", ["error", "skip"])
@pytest.mark.parametrize(
    "variant", ["os.system", "builtins.eval", "class instance", "ordered dict", "protocol 0 global"])
def test_malicious_pickle_is_refused_and_never_run(tmp_path: Path, variant: str, policy: str) -> None:
    marker = tmp_path / "executed"
    good = [pickle.dumps((2, 100, "两只狗在草地上奔跑")), pickle.dumps((7, 102, "红色的车"))]
    write_reference_lmdb(tmp_path / "src", pairs=[good[0], _malicious_pickles(marker)[variant], good[1]])
    out_dir = tmp_path / "out"
    with pytest.raises(DataError) as info:
        serialize_split("reference_lmdb", tmp_path / "src", "test", out_dir, entry=REF_ENTRY,
                        on_bad_record=policy, progress=False)
    message = str(info.value)
    assert "pairs [key '1']" in message
    assert "refusing to unpickle" in message and "global" in message
    assert not marker.exists()
    assert not out_dir.exists()


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (pickle.dumps({"image_id": 2, "text_id": 100, "text": "x"}), "found a dict"),
        (pickle.dumps((2, 100)), "tuple of 2 items"),
        (pickle.dumps([2, 100, "x"]), "found a list"),
        (pickle.dumps((2.0, 100, "x")), "found (float, int, str)"),
        (pickle.dumps((True, 100, "x")), "found (bool, int, str)"),
        (pickle.dumps((2, 100, b"bytes")), "found (int, int, bytes)"),
        (pickle.dumps((2, 100, "x")) + b"trailing", "unexpected bytes after the pickle"),
        (b"\x80\x04\x95garbage", "not a readable pickle"),
        (b"", "not a readable pickle"),
    ],
)
def test_wrong_shape_pickle(tmp_path: Path, value: bytes, problem: str) -> None:
    good = [pickle.dumps((2, 100, "两只狗在草地上奔跑")), pickle.dumps((7, 102, "红色的车"))]
    lmdb_dir = write_reference_lmdb(tmp_path / "src", pairs=[good[0], value, good[1]])
    with pytest.raises(DataError) as info:
        serialize_split("reference_lmdb", tmp_path / "src", "test", tmp_path / "out", entry=REF_ENTRY, progress=False)
    assert str(info.value).startswith(f"{lmdb_dir / 'pairs'} [key '1']: ")
    assert problem in str(info.value)
    assert not (tmp_path / "out").exists()

    report = serialize_split("reference_lmdb", tmp_path / "src", "test", tmp_path / "out", entry=REF_ENTRY,
                             on_bad_record="skip", progress=False)
    assert [(s.kind, s.key, s.file) for s in report.skipped] == [("text", "1", str(lmdb_dir / "pairs"))]
    assert problem in report.skipped[0].reason
    with SplitStore(tmp_path / "out") as store:
        assert [t.text_id for t in store.texts()] == [100, 102]


def test_load_reference_pair() -> None:
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        assert load_reference_pair(pickle.dumps((5, 6, "文本"), protocol=protocol)) == (5, 6, "文本")
    with pytest.raises(ForbiddenPickleError, match="posix.system|os.system"):
        load_reference_pair(pickle.dumps(os.system))


def test_reference_bad_image_value_goes_through_validation(tmp_path: Path) -> None:
    images = dict(REF_IMAGES)
    lmdb_dir = write_reference_lmdb(tmp_path / "src", images=images)
    env = lmdb.open(str(lmdb_dir / "imgs"), map_size=16 << 20)
    with env.begin(write=True) as txn:
        txn.put(b"10", b"not base64 at all!")
    env.close()
    with pytest.raises(DataError, match=r"imgs \[key '10'\] \(image_id=10\): invalid base64"):
        serialize_split("reference_lmdb", tmp_path / "src", "test", tmp_path / "out", entry=REF_ENTRY, progress=False)
    report = serialize_split("reference_lmdb", tmp_path / "src", "test", tmp_path / "out", entry=REF_ENTRY,
                             on_bad_record="skip", progress=False)
    assert [(s.kind, s.key) for s in report.skipped] == [("image", "10"), ("text", "1..2")]
    assert "skipped as a whole" in report.skipped[1].reason


def test_reference_count_mismatch_is_refused(tmp_path: Path) -> None:
    write_reference_lmdb(tmp_path / "src", num_images=4)
    with pytest.raises(DataError, match="num_images says 4 but the LMDB holds 3 records"):
        read_source("reference_lmdb", tmp_path / "src", "test", REF_ENTRY)


def test_reference_missing_layout(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not an LMDB environment"):
        read_source("reference_lmdb", tmp_path, "test", REF_ENTRY)


# --------------------------------------------------------------------------------------------


def test_unknown_format_and_bad_split(tmp_path: Path) -> None:
    assert SOURCE_FORMATS == ("raw_tsv", "coco_cn_data", "reference_lmdb", "aic_icc", "karpathy_json")
    with pytest.raises(ConfigError, match="unknown source format"):
        read_source("parquet", tmp_path, "test", {})
    with pytest.raises(ConfigError, match="invalid split name"):
        read_source("raw_tsv", tmp_path, "../test", {})


def test_raw_tsv_missing_file_and_bad_utf8(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"test_imgs\.tsv: file not found"):
        read_source("raw_tsv", tmp_path, "test", {})
    (tmp_path / "test_imgs.tsv").write_bytes(f"1\t{b64(make_image('PNG', (4, 4), 0))}\n".encode() + b"2\t\xff\xfe\n")
    (tmp_path / "test_texts.jsonl").write_text('{"text_id": 1, "text": "a", "image_ids": [1]}\n')
    with read_source("raw_tsv", tmp_path, "test", {}) as source:
        with pytest.raises(DataError, match=r"test_imgs\.tsv:2: not valid UTF-8 \(invalid start byte at byte 2 "):
            list(source.iter_images())


def _image_lines_read_as_text(path: Path) -> list[tuple[int, str, str]]:
    # What the images tsv reader yields, by definition: the file read as UTF-8 text, lines split as
    # text mode with newline="" splits them, blank lines skipped, fields stripped.
    fields = []
    with open(path, "r", encoding="utf-8", newline="") as handle:
        for line_no, line in enumerate(handle, start=1):
            line = line.rstrip("\r\n")
            if line.strip():
                image_id, sep, payload = line.partition("\t")
                fields.append((line_no, image_id.strip(), payload.strip() if sep else ""))
    return fields


@pytest.mark.parametrize("read_size", [None, 5, 64])
def test_images_tsv_lines_read_as_bytes_equal_the_text_read(tmp_path: Path, monkeypatch, read_size) -> None:
    # Small reads end in the middle of lines, between a CR and its LF, and right after a lone CR.
    from vlretrieval.data import raw
    from vlretrieval.data.raw import iter_image_lines

    if read_size is not None:
        monkeypatch.setattr(raw, "_IMAGE_LINES_READ", read_size)

    payload = b64(make_image("PNG", (4, 4), 0))
    content = "".join([
        f"1\t{payload}\n",
        f" 2 \t {payload}\x1f\r\n",       # CRLF; str.strip() also strips \x1c-\x1f
        "\n", "  \t \n", "\x1e\n",        # blank lines, counted but not yielded
        f"3\t{payload}\r4\t{payload}\n",  # a lone CR ends a line in text mode
        "\u3000\n",                       # non-ASCII whitespace only: blank
        f"五\t{payload}\u3000\n",          # a non-ASCII id and trailing non-ASCII space
        "6\n", "7\t\n",                   # no payload
        f"8\t{payload.replace('+', '-').rstrip('=')}\r",  # URL-safe, unpadded, CR at the end of the file
    ])
    path = tmp_path / "test_imgs.tsv"
    path.write_bytes(content.encode("utf-8"))
    got = [(line.line_no, line.image_id,
            line.payload.decode("ascii") if isinstance(line.payload, bytes) else line.payload)
           for line in iter_image_lines(path)]
    want = _image_lines_read_as_text(path)
    assert got == want
    assert [line_no for line_no, _, _ in want] == [1, 2, 6, 7, 9, 10, 11, 12]


def test_an_images_tsv_with_lines_ended_by_cr_alone_is_read_a_bounded_piece_at_a_time(tmp_path: Path) -> None:
    import tracemalloc

    from vlretrieval.data.raw import _IMAGE_LINES_READ, iter_image_lines

    payload = "A" * 40_000
    path = tmp_path / "test_imgs.tsv"
    path.write_bytes("".join(f"{image_id}\t{payload}\r" for image_id in range(400)).encode("ascii"))  # 16 MB
    tracemalloc.start()
    try:
        count = sum(1 for line in iter_image_lines(path) if line.payload == payload.encode("ascii"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 400
    assert peak < 8 * _IMAGE_LINES_READ  # a few reads, not the whole 16 MB file (32 MB with its lines)
