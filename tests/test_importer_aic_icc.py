"""AI Challenger image caption (``aic_icc``) importer: a JSON annotation list plus an image directory."""

from __future__ import annotations

import io
import json
import random
import re
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from vlretrieval.data.importers import clean_caption, read_source
from vlretrieval.data.lmdb_store import PairRecord, SplitStore, TextRecord, serialize_split
from vlretrieval.data.validation import validate_split
from vlretrieval.errors import ConfigError, DataError

ROOT = "ai_challenger_caption_validation_20170910"
JSON_NAME = "caption_validation_annotations_20170910.json"
IMAGE_DIR = "caption_validation_images_20170910"
ENTRY = {"root": ROOT, "split_files": {"test": JSON_NAME}, "image_dirs": {"test": IMAGE_DIR}}

NAMES = ["3cd32bef87ed98572bac868418521852ac3f6a70.jpg", "1d7ec4e6d6b1e8a9e9c1c2b0ad4c6b8d6f1b2a3c.jpg",
         "8f00a2b1a6b5d1c4e9e3f2a1b0c9d8e7f6a5b4c3.jpg", "aa11bb22cc33dd44ee55ff66aa77bb88cc99dd00.jpg"]
CAPTIONS = [
    ["一个穿着红色衣服的女人在街上走", "街道上有一个女人", "女人在路边行走", "红衣女子走在马路上", "一位女士在城市里散步"],
    ["两个男孩在草地上踢足球", "草坪上有两个孩子在玩球", "孩子们在踢球", "两个小男孩在运动", "绿色草地上的两个男孩"],
    ["厨房里有一个做饭的男人", "男人在厨房里炒菜", "一个人在做饭", "厨房里的厨师", "穿围裙的男人在灶台前"],
    ["海边有一群人", "沙滩上的人们", "一群人在海边玩耍", "海滩上有很多游客", "人们在海边散步"],
]


def make_jpeg(seed: int, size: tuple[int, int] = (24, 18)) -> bytes:
    rng = random.Random(seed)
    image = Image.new("RGB", size)
    image.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(size[0] * size[1])])
    buffer = io.BytesIO()
    image.save(buffer, "JPEG")
    return buffer.getvalue()


JPEGS = {name: make_jpeg(seed) for seed, name in enumerate(NAMES)}


def annotations(names=NAMES, captions=CAPTIONS) -> list[dict[str, Any]]:
    return [{"url": f"http://img.example/{name}", "image_id": name, "caption": list(caps)}
            for name, caps in zip(names, captions)]


def write_release(source_dir: Path, anns: list | None = None, *, skip_images: tuple[str, ...] = (),
                  raw_json: str | None = None) -> Path:
    root = source_dir / ROOT
    (root / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    for name, data in JPEGS.items():
        if name not in skip_images:
            (root / IMAGE_DIR / name).write_bytes(data)
    # ensure_ascii like the release, which stores Chinese as \u escapes on one line.
    text = raw_json if raw_json is not None else json.dumps(annotations() if anns is None else anns)
    (root / JSON_NAME).write_text(text, encoding="utf-8")
    return root


def serialize(tmp_path: Path, entry: dict = ENTRY, **kwargs):
    return serialize_split("aic_icc", tmp_path / "src", "test", tmp_path / "out", entry=entry, progress=False,
                           **kwargs)


def expected_texts(count: int | None = None) -> list[TextRecord]:
    flat = [TextRecord(5 * i + j, caption, (i,)) for i, caps in enumerate(CAPTIONS) for j, caption in enumerate(caps)]
    return flat if count is None else flat[:count]


def test_import_all_lines_values(tmp_path: Path) -> None:
    write_release(tmp_path / "src")
    report = serialize(tmp_path)
    assert (report.images_read, report.images_kept, report.texts_read, report.texts_kept, report.pairs) == (
        4, 4, 20, 20, 20)
    assert report.skipped == [] and report.images_unreferenced == 0
    with SplitStore(tmp_path / "out") as store:
        assert store.image_ids() == [0, 1, 2, 3]
        for image_id, name in enumerate(NAMES):
            assert store.image_bytes(image_id) == JPEGS[name]  # the file bytes, unchanged
        assert store.texts() == expected_texts()
        assert store.pair(7) == PairRecord(1, 7, CAPTIONS[1][2])
    gold = (tmp_path / "out" / "texts.jsonl").read_text(encoding="utf-8").splitlines()
    assert json.loads(gold[13]) == {"text_id": 13, "text": CAPTIONS[2][3], "image_ids": [2]}


@pytest.mark.parametrize(("max_lines", "images", "texts"), [(7, 2, 7), (5, 1, 5), (1, 1, 1), (20, 4, 20),
                                                             (10_000, 4, 20), (None, 4, 20)])
def test_max_lines_keeps_the_first_caption_lines(tmp_path: Path, max_lines: int | None, images: int,
                                                 texts: int) -> None:
    write_release(tmp_path / "src")
    entry = {**ENTRY, "max_lines": max_lines}
    report = serialize(tmp_path, entry)
    assert (report.images_kept, report.texts_kept, report.pairs) == (images, texts, texts)
    with SplitStore(tmp_path / "out") as store:
        assert store.image_ids() == list(range(images))
        assert store.texts() == expected_texts(texts)


def test_max_lines_seven_cuts_inside_the_second_image(tmp_path: Path) -> None:
    write_release(tmp_path / "src")
    serialize(tmp_path, {**ENTRY, "max_lines": 7})
    with SplitStore(tmp_path / "out") as store:
        second = [(t.text_id, t.text) for t in store.texts() if t.image_ids == (1,)]
        assert second == [(5, CAPTIONS[1][0]), (6, CAPTIONS[1][1])]
        assert store.image_bytes(1) == JPEGS[NAMES[1]]


@pytest.mark.parametrize("bad", [0, -3, True, "10000", 2.5])
def test_invalid_max_lines(tmp_path: Path, bad: Any) -> None:
    write_release(tmp_path / "src")
    with pytest.raises(ConfigError, match="max_lines must be a positive integer"):
        read_source("aic_icc", tmp_path / "src", "test", {**ENTRY, "max_lines": bad})


def test_image_ids_follow_first_appearance_of_the_file_name(tmp_path: Path) -> None:
    # Annotation 2 names the first image again: it gets no new id, and the next new file gets 2.
    names = [NAMES[3], NAMES[0], NAMES[3], NAMES[1]]
    write_release(tmp_path / "src", annotations(names))
    report = serialize(tmp_path)
    assert (report.images_kept, report.texts_kept) == (3, 20)
    with SplitStore(tmp_path / "out") as store:
        assert [store.image_bytes(i) for i in range(3)] == [JPEGS[NAMES[3]], JPEGS[NAMES[0]], JPEGS[NAMES[1]]]
        assert [t.image_ids[0] for t in store.texts()] == [0] * 5 + [1] * 5 + [0] * 5 + [2] * 5


def test_caption_whitespace_and_line_breaks(tmp_path: Path) -> None:
    captions = [list(c) for c in CAPTIONS]
    captions[0][1] = "  街道上有一个女人\n  "
    captions[0][3] = "红衣女子\n走在马路上"
    captions[1][0] = "two boys \r\n playing\u2028football\u3000"
    write_release(tmp_path / "src", annotations(captions=captions))
    serialize(tmp_path)
    with SplitStore(tmp_path / "out") as store:
        texts = {t.text_id: t.text for t in store.texts()}
    assert texts[1] == "街道上有一个女人"
    assert texts[3] == "红衣女子 走在马路上"
    assert texts[5] == "two boys playing football"
    assert len((tmp_path / "out" / "texts.jsonl").read_text(encoding="utf-8").splitlines()) == 20


def test_clean_caption() -> None:
    assert clean_caption("一个人\n\n在街上") == "一个人 在街上"
    assert clean_caption(" a\tb ") == "a\tb"  # only line breaks become spaces
    assert clean_caption(" \n ") == ""


def test_missing_image_file(tmp_path: Path) -> None:
    root = write_release(tmp_path / "src", skip_images=(NAMES[1],))
    missing = root / IMAGE_DIR / NAMES[1]
    with pytest.raises(DataError) as info:
        serialize(tmp_path)
    assert str(info.value) == (f"{missing} (image_id=1): image file not found (named by annotation 1 of "
                               f"{JSON_NAME})")
    assert not (tmp_path / "out").exists()

    report = serialize(tmp_path, on_bad_record="skip")
    assert (report.images_kept, report.texts_kept, report.images_skipped, report.texts_skipped) == (3, 15, 1, 5)
    skipped = [(s.kind, s.file, s.key, s.id) for s in report.skipped]
    assert skipped == [("image", str(missing), None, 1)] + [
        ("text", str(root / JSON_NAME), f"annotation 1, caption {j}", 5 + j) for j in range(5)]
    assert all("its image 1 was skipped (image file not found" in s.reason for s in report.skipped[1:])
    with SplitStore(tmp_path / "out") as store:
        assert store.image_ids() == [0, 2, 3]  # ids stay those of the full release
        assert [t.text_id for t in store.texts()] == [*range(5), *range(10, 20)]


def test_missing_image_outside_max_lines_is_not_read(tmp_path: Path) -> None:
    write_release(tmp_path / "src", skip_images=(NAMES[3],))
    report = serialize(tmp_path, {**ENTRY, "max_lines": 15})
    assert (report.images_kept, report.texts_kept, report.skipped) == (3, 15, [])


@pytest.mark.parametrize(("caption", "problem"), [(42, "caption is a number, not a string"),
                                                  (None, "caption is null, not a string"),
                                                  (["a"], "caption is an array, not a string"),
                                                  (" \n\t", "caption is empty")])
def test_bad_caption(tmp_path: Path, caption: Any, problem: str) -> None:
    captions = [list(c) for c in CAPTIONS]
    captions[2][3] = caption
    root = write_release(tmp_path / "src", annotations(captions=captions))
    with pytest.raises(DataError) as info:
        serialize(tmp_path)
    assert str(info.value) == f"{root / JSON_NAME} [key 'annotation 2, caption 3'] (text_id=13): {problem}"

    report = serialize(tmp_path, on_bad_record="skip")
    assert [(s.kind, s.key, s.id, s.reason) for s in report.skipped] == [
        ("text", "annotation 2, caption 3", 13, problem)]
    with SplitStore(tmp_path / "out") as store:
        assert [t.text_id for t in store.texts()] == [i for i in range(20) if i != 13]
        assert store.image_ids() == [0, 1, 2, 3]


def test_bad_annotations(tmp_path: Path) -> None:
    anns: list[Any] = annotations()
    anns[1] = "not an object"                                  # no captions known: adds no line
    anns[2] = {"url": "u", "caption": CAPTIONS[2]}             # no image: its 5 lines are bad
    anns.insert(3, {"image_id": NAMES[2], "caption": "one"})   # caption not a list: no line
    anns.append({"image_id": "../outside.jpg", "caption": ["逃出目录"]})
    anns.append({"image_id": NAMES[1]})
    root = write_release(tmp_path / "src", anns)
    with pytest.raises(DataError, match=r"\[key 'annotation 1'\]: annotation is a string, not an object"):
        serialize(tmp_path)

    report = serialize(tmp_path, on_bad_record="skip")
    assert [(s.kind, s.key, s.id, s.reason) for s in report.skipped] == [
        ("text", "annotation 1", None, "annotation is a string, not an object with image_id and caption"),
        *[("text", f"annotation 2, caption {j}", 5 + j, "annotation lacks the key image_id") for j in range(5)],
        ("text", "annotation 3", None, "caption is a string, not an array of captions"),
        ("text", "annotation 5, caption 0", 15,
         "image_id '../outside.jpg' is not a plain file name in the image directory"),
        ("text", "annotation 6", None, "annotation lacks the key caption"),
    ]
    assert all(s.file == str(root / JSON_NAME) for s in report.skipped)
    assert (report.images_read, report.texts_read, report.texts_kept) == (2, 19, 10)
    with SplitStore(tmp_path / "out") as store:
        assert [store.image_bytes(i) for i in (0, 1)] == [JPEGS[NAMES[0]], JPEGS[NAMES[3]]]
        assert [(t.text_id, t.image_ids) for t in store.texts()] == [
            *[(j, (0,)) for j in range(5)], *[(10 + j, (1,)) for j in range(5)]]


@pytest.mark.parametrize(("raw", "problem"), [
    ('[{"image_id": "a.jpg", "caption": ["x"]}', r"not valid JSON \(Expecting ',' delimiter at line 1 column 41\)"),
    ("", r"not valid JSON \(Expecting value at line 1 column 1\)"),
    ('{"image_id": "a.jpg"}', "expected a JSON array of annotations, found an object"),
])
@pytest.mark.parametrize("policy", ["error", "skip"])
def test_invalid_annotation_file(tmp_path: Path, raw: str, problem: str, policy: str) -> None:
    root = write_release(tmp_path / "src", raw_json=raw)
    with pytest.raises(DataError) as info:
        serialize(tmp_path, on_bad_record=policy)
    assert info.value.location == str(root / JSON_NAME)
    assert re.fullmatch(problem, info.value.problem)
    assert not (tmp_path / "out").exists()


def test_annotation_file_not_utf8(tmp_path: Path) -> None:
    root = write_release(tmp_path / "src")
    (root / JSON_NAME).write_bytes(b'[{"image_id": "a.jpg", "caption": ["\xff"]}]')
    with pytest.raises(DataError, match=rf"{JSON_NAME}: not valid UTF-8"):
        serialize(tmp_path)


def test_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    root = write_release(tmp_path / "src")
    (root / JSON_NAME).write_bytes(b"\xef\xbb\xbf" + json.dumps(annotations(), ensure_ascii=False).encode("utf-8"))
    assert serialize(tmp_path).texts_kept == 20


def test_two_passes_read_the_images_again(tmp_path: Path) -> None:
    # validate_split re-reads the kept images from disk and checks them against the first pass.
    root = write_release(tmp_path / "src")
    with read_source("aic_icc", tmp_path / "src", "test", {**ENTRY, "max_lines": 12}) as source:
        images, texts, report = validate_split(source)
        assert [t.text_id for t in texts] == list(range(12))
        (root / IMAGE_DIR / NAMES[2]).write_bytes(JPEGS[NAMES[0]])
        assert next(images).data == JPEGS[NAMES[0]]
        assert next(images).data == JPEGS[NAMES[1]]
        with pytest.raises(DataError, match="changed since it was validated"):
            next(images)


def test_registry_keys_and_layout(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"needs split_files\.test"):
        read_source("aic_icc", tmp_path, "test", {"root": ROOT, "image_dirs": ENTRY["image_dirs"]})
    with pytest.raises(ConfigError, match=r"needs image_dirs\.test"):
        read_source("aic_icc", tmp_path, "test", {"root": ROOT, "split_files": ENTRY["split_files"]})
    with pytest.raises(DataError, match=rf"{JSON_NAME}: file not found \(format aic_icc expects it\)"):
        read_source("aic_icc", tmp_path, "test", ENTRY)
    root = write_release(tmp_path / "src")
    (root / IMAGE_DIR / NAMES[0]).unlink()
    for name in NAMES[1:]:
        (root / IMAGE_DIR / name).unlink()
    (root / IMAGE_DIR).rmdir()
    with pytest.raises(DataError, match=rf"{IMAGE_DIR}: image directory not found"):
        read_source("aic_icc", tmp_path / "src", "test", ENTRY)
