"""Serialized splits: exact round trip, on-disk layout, read-only reader, fork safety, atomicity."""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import pickle
import random
from pathlib import Path

import lmdb
import pytest
from PIL import Image

from vlretrieval.data import lmdb_store, raw
from vlretrieval.data.importers import RawTsvSplit
from vlretrieval.data.lmdb_store import PairRecord, SplitStore, TextRecord, serialize_split
from vlretrieval.errors import DataError

from .conftest import make_image

ENTRY = {"root": "Demo-CN"}


def write_raw_split(source_dir: Path, split: str = "valid") -> tuple[dict[int, bytes], list[dict]]:
    """A raw split with sparse, unordered ids, PNG and JPEG images and multi-image texts."""
    rng = random.Random(7)
    image_ids = rng.sample(range(100, 100_000), 15)  # deliberately not sorted
    images = {image_id: make_image("PNG" if k % 2 else "JPEG", (16 + k, 12 + 2 * k), seed=k)
              for k, image_id in enumerate(image_ids)}
    texts = []
    text_ids = rng.sample(range(0, 10_000), 40)
    for k, text_id in enumerate(text_ids):
        named = [image_ids[k % len(image_ids)]]
        if k % 7 == 3:
            named.append(image_ids[(k + 5) % len(image_ids)])
        texts.append({"text_id": text_id, "text": f"一只猫 {k} — \"quoted\"\\tab\u2028\x85", "image_ids": named})
    root = source_dir / ENTRY["root"]
    root.mkdir(parents=True, exist_ok=True)
    with open(raw.images_tsv_path(root, split), "w", encoding="utf-8") as handle:
        for image_id, data in images.items():
            raw.write_image_line(handle, image_id, data)
    with open(raw.texts_jsonl_path(root, split), "w", encoding="utf-8") as handle:
        for text in texts:
            raw.write_text_line(handle, text["text_id"], text["text"], text["image_ids"])
    return images, texts


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("store")
    images, texts = write_raw_split(base / "src")
    out_dir = base / "serialized" / "valid"
    report = serialize_split("raw_tsv", base / "src", "valid", out_dir, entry=ENTRY, progress=False)
    return out_dir, images, texts, report


def test_round_trip_values_counts_and_order(built) -> None:
    out_dir, images, texts, report = built
    expected_pairs = [PairRecord(i, t["text_id"], t["text"]) for t in texts for i in t["image_ids"]]
    assert (report.images_kept, report.texts_kept, report.pairs) == (len(images), len(texts), len(expected_pairs))

    with SplitStore(out_dir) as store:
        assert store.num_images == len(images)
        assert store.num_texts == len(texts)
        assert store.num_pairs == len(expected_pairs)
        assert store.image_ids() == list(images)  # source order, not sorted
        for image_id, data in images.items():
            assert store.image_bytes(image_id) == data
            with Image.open(io.BytesIO(data)) as original:
                opened = store.open_image(image_id)
                assert opened.mode == "RGB" and opened.size == original.size
        assert store.texts() == [TextRecord(t["text_id"], t["text"], tuple(t["image_ids"])) for t in texts]
        assert store.text_ids() == [t["text_id"] for t in texts]
        assert store.text(3) == store.texts()[3]
        assert [store.pair(i) for i in range(store.num_pairs)] == expected_pairs

    gold = (out_dir / "texts.jsonl").read_text(encoding="utf-8").splitlines()  # safe: U+2028 etc. are escaped
    assert [json.loads(line) for line in gold] == texts
    on_disk = json.loads((out_dir / "validation_report.json").read_text(encoding="utf-8"))
    assert on_disk["counts"]["images"]["read"] == len(images)
    assert on_disk["counts"]["pairs"] == len(expected_pairs)
    assert on_disk["skipped"] == []


def test_on_disk_keys_are_plain(built) -> None:
    out_dir, images, texts, _report = built
    env = lmdb.open(str(out_dir / "imgs"), readonly=True, lock=False)
    with env.begin() as txn:
        entries = dict(txn.cursor())
    env.close()
    meta = {k: v for k, v in entries.items() if k.startswith(b"__")}
    data_entries = {k: v for k, v in entries.items() if not k.startswith(b"__")}
    assert data_entries == {str(i).encode(): d for i, d in images.items()}
    assert meta[b"__format__"] == b"vlretrieval.split"
    assert meta[b"__version__"] == b"1"
    assert meta[b"__num_images__"] == str(len(images)).encode()
    assert json.loads(meta[b"__image_ids__"]) == list(images)

    env = lmdb.open(str(out_dir / "pairs"), readonly=True, lock=False)
    with env.begin() as txn:
        entries = dict(txn.cursor())
    env.close()
    pair_keys = sorted((k for k in entries if k.isdigit()), key=int)
    assert pair_keys == [str(i).encode() for i in range(len(pair_keys))]
    assert json.loads(entries[b"0"]) == {"image_id": texts[0]["image_ids"][0], "text_id": texts[0]["text_id"],
                                         "text": texts[0]["text"]}
    assert [json.loads(entries[b"text:%d" % i]) for i in range(len(texts))] == texts
    assert entries[b"__num_samples__"] == str(len(pair_keys)).encode()
    assert entries[b"__num_texts__"] == str(len(texts)).encode()
    assert json.loads(entries[b"__text_ids__"]) == [t["text_id"] for t in texts]
    assert not any(value.startswith(b"\x80") for value in entries.values())  # nothing pickled


def test_reader_is_read_only(built) -> None:
    out_dir, images, _texts, _report = built
    with SplitStore(out_dir) as store:
        store.image_bytes(next(iter(images)))
        imgs_env, pairs_env = store._open()
        for env in (imgs_env, pairs_env):
            with pytest.raises(lmdb.ReadonlyError):
                with env.begin(write=True) as txn:
                    txn.put(b"1", b"overwritten")


def test_lookup_errors(built) -> None:
    out_dir, _images, _texts, _report = built
    with SplitStore(out_dir) as store:
        with pytest.raises(KeyError, match="image id 42"):
            store.image_bytes(42)
        with pytest.raises(IndexError):
            store.pair(store.num_pairs)
        with pytest.raises(IndexError):
            store.pair(-1)
        with pytest.raises(IndexError):
            store.text(store.num_texts)


_FORKED_STORE: SplitStore | None = None


def _digest_in_worker(image_id: int) -> tuple[str, PairRecord]:
    assert _FORKED_STORE is not None
    return hashlib.sha256(_FORKED_STORE.image_bytes(image_id)).hexdigest(), _FORKED_STORE.pair(0)


def test_reader_works_across_fork(built) -> None:
    global _FORKED_STORE
    out_dir, images, _texts, _report = built
    store = SplitStore(out_dir)
    store.image_bytes(next(iter(images)))  # the parent has live environments before forking
    _FORKED_STORE = store
    try:
        with multiprocessing.get_context("fork").Pool(2) as pool:
            results = pool.map(_digest_in_worker, list(images))
        assert [digest for digest, _pair in results] == [hashlib.sha256(d).hexdigest() for d in images.values()]
        assert all(pair == store.pair(0) for _digest, pair in results)
        assert store.image_bytes(next(iter(images))) == next(iter(images.values()))  # parent still fine
    finally:
        _FORKED_STORE = None
        store.close()


def test_store_pickles_without_handles(built) -> None:
    out_dir, images, _texts, _report = built
    with SplitStore(out_dir) as store:
        store.image_bytes(next(iter(images)))
        clone = pickle.loads(pickle.dumps(store))
    with clone:
        assert clone.image_ids() == list(images)
        assert clone.image_bytes(next(iter(images))) == next(iter(images.values()))


def test_not_a_split_and_unknown_version(tmp_path: Path, built) -> None:
    with pytest.raises(DataError, match="not a serialized split"):
        SplitStore(tmp_path)

    foreign = tmp_path / "foreign"
    for name in ("imgs", "pairs"):
        (foreign / name).mkdir(parents=True)
        env = lmdb.open(str(foreign / name), map_size=1 << 20)
        with env.begin(write=True) as txn:
            txn.put(b"num_images" if name == "imgs" else b"num_samples", b"0")
        env.close()
    with pytest.raises(DataError, match="reference_lmdb"):
        SplitStore(foreign)

    out_dir, *_ = built
    copy = tmp_path / "copy"
    for name in ("imgs", "pairs"):
        (copy / name).mkdir(parents=True)
        (copy / name / "data.mdb").write_bytes((out_dir / name / "data.mdb").read_bytes())
    env = lmdb.open(str(copy / "imgs"), map_size=64 << 20)
    with env.begin(write=True) as txn:
        txn.put(b"__version__", b"99")
    env.close()
    with pytest.raises(DataError, match="unknown serialized split format version b'99'"):
        SplitStore(copy)


def test_rebuild_replaces_atomically(tmp_path: Path) -> None:
    images, _texts = write_raw_split(tmp_path / "src")
    out_dir = tmp_path / "serialized" / "valid"
    out_dir.mkdir(parents=True)
    (out_dir / "stale.txt").write_text("old")
    serialize_split("raw_tsv", tmp_path / "src", "valid", out_dir, entry=ENTRY, progress=False)
    assert sorted(p.name for p in out_dir.iterdir()) == ["imgs", "pairs", "texts.jsonl", "validation_report.json"]
    assert sorted(p.name for p in out_dir.parent.iterdir()) == ["valid"]
    with SplitStore(out_dir) as store:
        assert store.num_images == len(images)


def test_failure_while_writing_leaves_no_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_raw_split(tmp_path / "src")
    out_dir = tmp_path / "serialized" / "valid"

    def boom(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(lmdb_store, "_write_texts_jsonl", boom)
    with pytest.raises(OSError, match="disk full"):
        serialize_split("raw_tsv", tmp_path / "src", "valid", out_dir, entry=ENTRY, progress=False)
    assert list(out_dir.parent.iterdir()) == []


def test_writer_grows_a_full_map(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lmdb_store, "_MIN_MAP_SIZE", 64 << 10)
    writer = lmdb_store._LmdbWriter(tmp_path / "env", map_size=0)
    values = {str(i).encode(): bytes([i % 251]) * (9000 + i) for i in range(300)}  # ~2.8 MB into 64 KB
    for key, value in values.items():
        writer.put(key, value)
    writer.close()
    env = lmdb.open(str(tmp_path / "env"), readonly=True, lock=False)
    with env.begin() as txn:
        assert dict(txn.cursor()) == values
    env.close()


def test_serialize_grows_map_when_estimate_is_short(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images, texts = write_raw_split(tmp_path / "src")
    monkeypatch.setattr(lmdb_store, "_MIN_MAP_SIZE", 16 << 10)
    monkeypatch.setattr(RawTsvSplit, "input_bytes", lambda self: 0)
    out_dir = tmp_path / "out"
    serialize_split("raw_tsv", tmp_path / "src", "valid", out_dir, entry=ENTRY, progress=False)
    with SplitStore(out_dir) as store:
        assert all(store.image_bytes(i) == d for i, d in images.items())
        assert [t.text_id for t in store.texts()] == [t["text_id"] for t in texts]


def test_progress_goes_to_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_raw_split(tmp_path / "src")
    serialize_split("raw_tsv", tmp_path / "src", "valid", tmp_path / "out", entry=ENTRY, progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "15 images, 40 texts" in captured.err


def test_info_cli(built, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir, images, texts, _report = built
    assert lmdb_store.main(["info", str(out_dir)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["images"], info["texts"]) == (len(images), len(texts))


def test_two_stores_on_one_split_share_the_process(built) -> None:
    out_dir, images, _texts, _report = built
    first_id, first_bytes = next(iter(images.items()))
    with SplitStore(out_dir) as a, SplitStore(out_dir) as b:
        assert a.image_bytes(first_id) == b.image_bytes(first_id) == first_bytes
        a.close()
        assert b.image_bytes(first_id) == first_bytes  # closing one leaves the other usable
        assert a.image_bytes(first_id) == first_bytes  # and a closed store reopens on demand


def test_open_store_survives_rebuild_in_place(tmp_path: Path) -> None:
    images, _texts = write_raw_split(tmp_path / "src")
    out_dir = tmp_path / "out"
    serialize_split("raw_tsv", tmp_path / "src", "valid", out_dir, entry=ENTRY, progress=False)
    old = SplitStore(out_dir)
    first_id = old.image_ids()[0]
    old.image_bytes(first_id)
    serialize_split("raw_tsv", tmp_path / "src", "valid", out_dir, entry=ENTRY, progress=False)
    with SplitStore(out_dir) as new:
        assert new.image_bytes(first_id) == images[first_id]
    assert old.image_bytes(first_id) == images[first_id]  # still the old, unlinked files
    old.close()
