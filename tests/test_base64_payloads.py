"""Base64 payloads in every spelling the reference readers take: standard and URL-safe alphabets,
padded or not, through the real serializer (LMDB) and every text importer; anything else refused
with the file, line and id."""

from __future__ import annotations

import base64
import pickle
import random
from pathlib import Path

import lmdb
import numpy as np
import pytest

from vlretrieval.data import raw
from vlretrieval.data.base64_payload import Base64PayloadError, decode_base64, decode_base64_payload
from vlretrieval.data.lmdb_store import SplitStore, TextRecord, serialize_split
from vlretrieval.data.regions import FEATURE_DIM, FeatureRow, decode_features
from vlretrieval.errors import DataError

from .conftest import make_image


def standard(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def url_safe(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii")


def url_safe_unpadded(data: bytes) -> str:
    return url_safe(data).rstrip("=")


def mixed(data: bytes) -> str:
    """The standard spelling with every other '+' and '/' written in the URL-safe alphabet."""
    out, flip = [], False
    for char in standard(data):
        if char in "+/":
            flip = not flip
            char = {"+": "-", "/": "_"}[char] if flip else char
        out.append(char)
    return "".join(out)


SPELLINGS = {"standard": standard, "url_safe": url_safe, "url_safe_unpadded": url_safe_unpadded,
             "standard_unpadded": lambda data: standard(data).rstrip("="), "mixed": mixed}


def padded_image(fmt: str, size: tuple[int, int], seed: int) -> bytes:
    """A seeded image whose base64 needs padding and uses both symbols the two alphabets spell differently.

    Noise compresses to a length set by the size, so the size is what varies until both hold.
    """
    width, height = size
    for extra in range(12):
        data = make_image(fmt, (width + extra, height + extra), seed)
        encoded = standard(data)
        if len(data) % 3 and "+" in encoded and "/" in encoded:
            return data
    raise AssertionError("no width gives a padded payload with '+' and '/'")


# --------------------------------------------------------------------------------------------
# the decoder


def test_every_spelling_of_the_same_bytes_decodes_to_them() -> None:
    rng = random.Random(5)
    for length in range(0, 70):
        data = bytes(rng.randrange(256) for _ in range(length))
        for name, spell in SPELLINGS.items():
            encoded = spell(data)
            # What the reference readers decode (they need the padding) must decode the same here.
            if not name.endswith("unpadded"):
                assert base64.urlsafe_b64decode(encoded) == data
            assert decode_base64_payload(encoded) == data, (name, length)
            assert decode_base64_payload(encoded.encode("ascii")) == data, (name, length)
    payload = url_safe(b"\xfb\xff\xbf\xfb\xef")
    assert "-" in payload and "_" in payload
    assert decode_base64(payload) == (b"\xfb\xff\xbf\xfb\xef", None)
    assert decode_base64_payload(memoryview(b"-_-_")) == b"\xfb\xff\xbf"


@pytest.mark.parametrize(
    "payload, problem",
    [
        ("iVBORw0KGgo!!notbase64", "character '!' at position 11 is not in the standard or URL-safe base64 alphabet"),
        ("aVZC\nT1J3", "character '\\n' at position 4"),
        ("aVZC T1J3", "character ' ' at position 4"),
        ("aVZC图片", "character '图' at position 4"),
        (b"aVZC\xff\xfe", "character 'ÿ' at position 4"),
        ("aVZCT", "5 characters: no base64 is 1 more than a multiple of 4 characters long"),
        ("aVZCTw=", "7 characters with padding: padded base64 is a multiple of 4 characters long"),
        ("aVZCTw===", "9 characters with padding"),
        ("YQ==YQ==", "Excess data after padding"),
        ("=YQ=", "Leading padding not allowed"),
        ("YQ=x", "Discontinuous padding not allowed"),
    ],
)
def test_what_is_not_base64_is_refused_with_the_reason(payload: str | bytes, problem: str) -> None:
    with pytest.raises(Base64PayloadError) as info:
        decode_base64_payload(payload)
    assert problem in str(info.value)
    data, reason = decode_base64(payload)
    assert data is None and reason == f"invalid base64 ({info.value})"


def test_an_image_payload_cannot_be_empty() -> None:
    assert decode_base64_payload("") == b""
    assert decode_base64("") == (None, "empty base64 payload")
    assert decode_base64(b"") == (None, "empty base64 payload")


# --------------------------------------------------------------------------------------------
# raw archives (Flickr30k-CN, COCO-CN, MUGE layout) through the serializer

IMAGES = {1: padded_image("PNG", (23, 19), 1), 2: padded_image("JPEG", (30, 21), 2),
          3: padded_image("PNG", (17, 26), 3), 4: padded_image("JPEG", (25, 25), 4)}
TEXTS = [(10, "两只狗在草地上", [1]), (11, "一个人骑车", [2, 3]), (12, "厨房", [4]), (13, "小孩", [1])]


def write_raw_split(root: Path, spellings: dict[int, str], *, broken: dict[int, str] | None = None) -> None:
    root.mkdir(parents=True, exist_ok=True)
    with open(raw.images_tsv_path(root, "test"), "w", encoding="utf-8") as handle:
        for image_id, data in IMAGES.items():
            payload = (broken or {}).get(image_id) or SPELLINGS[spellings[image_id]](data)
            handle.write(f"{image_id}\t{payload}\n")
    with open(raw.texts_jsonl_path(root, "test"), "w", encoding="utf-8") as handle:
        for text_id, text, image_ids in TEXTS:
            raw.write_text_line(handle, text_id, text, image_ids)


def stored_images(out_dir: Path) -> dict[int, bytes]:
    with SplitStore(out_dir) as store:
        return {image_id: store.image_bytes(image_id) for image_id in store.image_ids()}


def test_url_safe_raw_archive_serializes_to_the_same_bytes_as_the_standard_one(tmp_path: Path) -> None:
    url_safe_payloads = {image_id: url_safe(data) for image_id, data in IMAGES.items()}
    assert all("-" in p and "_" in p and p.endswith("=") for p in url_safe_payloads.values())

    entry = {"root": "ds"}
    write_raw_split(tmp_path / "standard" / "ds", dict.fromkeys(IMAGES, "standard"))
    # URL-safe with and without padding, and one line in a mix of both alphabets.
    write_raw_split(tmp_path / "url_safe" / "ds",
                    {1: "url_safe", 2: "url_safe_unpadded", 3: "url_safe_unpadded", 4: "mixed"})
    reports = {}
    for name in ("standard", "url_safe"):
        reports[name] = serialize_split("raw_tsv", tmp_path / name, "test", tmp_path / "out" / name, entry=entry,
                                        progress=False)
    assert stored_images(tmp_path / "out" / "url_safe") == stored_images(tmp_path / "out" / "standard") == IMAGES
    with SplitStore(tmp_path / "out" / "url_safe") as store:
        assert store.texts() == [TextRecord(t, text, tuple(ids)) for t, text, ids in TEXTS]
    url_counts = reports["url_safe"].to_dict()["counts"]
    assert url_counts == reports["standard"].to_dict()["counts"]
    assert url_counts["images"]["kept"] == 4 and url_counts["images"]["skipped"] == 0
    assert url_counts["images"]["bytes"] == sum(map(len, IMAGES.values()))


@pytest.mark.parametrize("broken_payload, problem", [
    ("iVBORw0K!Ggo", "character '!' at position 8"),
    ("iVBORw0KG", "9 characters: no base64 is 1 more than a multiple of 4"),
    ("iVBORw0KGg=", "11 characters with padding"),
])
def test_broken_base64_in_a_url_safe_archive_is_refused_and_named(tmp_path: Path, broken_payload: str,
                                                                   problem: str) -> None:
    entry = {"root": "ds"}
    write_raw_split(tmp_path / "src" / "ds", dict.fromkeys(IMAGES, "url_safe_unpadded"), broken={3: broken_payload})
    images_file = raw.images_tsv_path(tmp_path / "src" / "ds", "test")
    with pytest.raises(DataError) as info:
        serialize_split("raw_tsv", tmp_path / "src", "test", tmp_path / "out", entry=entry, progress=False)
    assert str(info.value).startswith(f"{images_file}:3 (image_id=3): invalid base64 (")
    assert problem in str(info.value)
    assert not (tmp_path / "out").exists()

    report = serialize_split("raw_tsv", tmp_path / "src", "test", tmp_path / "out", entry=entry,
                             on_bad_record="skip", progress=False)
    skipped = report.to_dict()["skipped"]
    assert [(s["kind"], s["file"], s["line"], s["id"]) for s in skipped] == [
        ("image", str(images_file), 3, 3),
        ("text", str(raw.texts_jsonl_path(tmp_path / "src" / "ds", "test")), 2, 11),
    ]
    assert problem in skipped[0]["reason"]
    assert stored_images(tmp_path / "out") == {i: IMAGES[i] for i in (1, 2, 4)}


# --------------------------------------------------------------------------------------------
# the other importers that read base64


def test_coco_cn_data_takes_url_safe_payloads_and_knows_two_spellings_are_one_image(tmp_path: Path) -> None:
    path = tmp_path / "src" / "test.coco_cn.data"
    path.parent.mkdir(parents=True)
    lines = [("一个人骑着摩托车", 1, url_safe_unpadded), ("摩托车停在路边", 1, standard),  # same image, two spellings
             ("厨房里的女人", 2, url_safe), ("小孩和牛", 3, mixed)]
    path.write_text("".join(f"{text}\t{image_id}\t{spell(IMAGES[image_id])}\n" for text, image_id, spell in lines),
                    encoding="utf-8")
    entry = {"split_files": {"test": "test.coco_cn.data"}}
    report = serialize_split("coco_cn_data", tmp_path / "src", "test", tmp_path / "out", entry=entry,
                             progress=False)
    assert (report.images_kept, report.texts_kept, report.skipped) == (3, 4, [])
    assert stored_images(tmp_path / "out") == {i: IMAGES[i] for i in (1, 2, 3)}

    # A broken record is named by file, line and id.
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(f"坏的图\t4\t{url_safe_unpadded(IMAGES[4])[:-1]}!\n")
    with pytest.raises(DataError, match=rf"{path}:5 \(image_id=4\): invalid base64 \(character '!'"):
        serialize_split("coco_cn_data", tmp_path / "src", "test", tmp_path / "out2", entry=entry, progress=False)


def write_reference_imgs(lmdb_dir: Path, values: dict[int, bytes]) -> None:
    """The ``imgs``/``pairs`` LMDBs of Chinese-CLIP's build_lmdb_dataset.py, with the values given."""
    for name in ("imgs", "pairs"):
        (lmdb_dir / name).mkdir(parents=True, exist_ok=True)
    pairs = [pickle.dumps((image_id, text_id, text)) for text_id, text, ids in TEXTS for image_id in ids]
    env = lmdb.open(str(lmdb_dir / "pairs"), map_size=16 << 20)
    with env.begin(write=True) as txn:
        for index, value in enumerate(pairs):
            txn.put(str(index).encode(), value)
        txn.put(b"num_samples", str(len(pairs)).encode())
    env.close()
    env = lmdb.open(str(lmdb_dir / "imgs"), map_size=16 << 20)
    with env.begin(write=True) as txn:
        for image_id, value in values.items():
            txn.put(str(image_id).encode(), value)
        txn.put(b"num_images", str(len(values)).encode())
    env.close()


def test_reference_lmdb_takes_url_safe_values(tmp_path: Path) -> None:
    entry = {"root": "Flickr30k-CN"}
    lmdb_dir = tmp_path / "src" / "Flickr30k-CN" / "lmdb" / "test"
    write_reference_imgs(lmdb_dir, {image_id: url_safe_unpadded(data).encode() for image_id, data in IMAGES.items()})
    serialize_split("reference_lmdb", tmp_path / "src", "test", tmp_path / "out", entry=entry, progress=False)
    assert stored_images(tmp_path / "out") == IMAGES

    values = {image_id: url_safe(data).encode() for image_id, data in IMAGES.items()}
    values[2] = values[2][:-3] + b"*=="
    write_reference_imgs(lmdb_dir, values)
    with pytest.raises(DataError, match=r"imgs \[key '2'\] \(image_id=2\): invalid base64 \(character '\*'"):
        serialize_split("reference_lmdb", tmp_path / "src", "test", tmp_path / "out2", entry=entry, progress=False)


def test_region_features_take_url_safe_payloads() -> None:
    rng = np.random.default_rng(3)
    # A box count whose float bytes are not a multiple of 3, so the payload is padded.
    features = rng.standard_normal((2, FEATURE_DIM)).astype("<f4")
    data = features.tobytes()
    assert len(data) % 3
    for spell in SPELLINGS.values():
        array, problem = decode_features(FeatureRow("features.tsv", 1, 0, "7", "2", spell(data)))
        assert problem is None and np.array_equal(array, features)
    # No boxes: no payload at all.
    array, problem = decode_features(FeatureRow("features.tsv", 1, 0, "7", "0", ""))
    assert problem is None and array.shape == (0, FEATURE_DIM)
    _array, problem = decode_features(FeatureRow("features.tsv", 1, 0, "7", "2", url_safe(data)[:-3] + "!=="))
    assert problem.startswith("features are not valid base64 (character '!'")
