"""Validation of raw splits: every bad-record class under both policies, end to end."""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
from PIL import Image

from vlretrieval.data import raw
from vlretrieval.data.importers import read_source
from vlretrieval.data.lmdb_store import SplitStore, serialize_split
from vlretrieval.data.validation import POLICIES, check_image_bytes, decode_base64, validate_split
from vlretrieval.errors import DataError

from .conftest import make_image

SPLIT = "test"
ENTRY = {"root": "ds"}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@dataclass
class RawSplit:
    """A small raw split kept as editable lines, so each test can plant one defect."""

    image_lines: list[str] = field(default_factory=list)
    text_lines: list[str] = field(default_factory=list)
    images: dict[int, bytes] = field(default_factory=dict)

    def write(self, source_dir: Path) -> Path:
        root = source_dir / ENTRY["root"]
        root.mkdir(parents=True, exist_ok=True)
        (root / f"{SPLIT}_imgs.tsv").write_text("".join(line + "\n" for line in self.image_lines), encoding="utf-8")
        (root / f"{SPLIT}_texts.jsonl").write_text("".join(line + "\n" for line in self.text_lines), encoding="utf-8")
        return root


# image id -> format; texts (line order): text id -> image ids. Every image is named by a text,
# and text 16 names two images so the "skip the whole text" rule is exercised.
IMAGE_FORMATS = {1: "PNG", 2: "JPEG", 3: "PNG", 4: "JPEG", 5: "PNG", 6: "JPEG"}
TEXTS = [(10, [1]), (11, [1]), (12, [2]), (13, [3]), (14, [4]), (15, [5]), (16, [5, 6]), (17, [6])]


def base_split() -> RawSplit:
    split = RawSplit()
    for image_id, fmt in IMAGE_FORMATS.items():
        data = make_image(fmt, (24 + image_id, 20), seed=image_id)
        split.images[image_id] = data
        buffer = io.StringIO()
        raw.write_image_line(buffer, image_id, data)
        split.image_lines.append(buffer.getvalue().rstrip("\n"))
    for text_id, image_ids in TEXTS:
        buffer = io.StringIO()
        raw.write_text_line(buffer, text_id, f"第{text_id}条描述 caption {text_id}", image_ids)
        split.text_lines.append(buffer.getvalue().rstrip("\n"))
    return split


def set_payload(split: RawSplit, line: int, payload: str) -> None:
    image_id = split.image_lines[line - 1].split("\t")[0]
    split.image_lines[line - 1] = f"{image_id}\t{payload}"


def set_text(split: RawSplit, line: int, obj: object) -> None:
    split.text_lines[line - 1] = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)


@dataclass(frozen=True)
class Case:
    name: str
    mutate: Callable[[RawSplit], None]
    kind: str  # where the defect is: "image" or "text"
    line: int
    record_id: object  # id as reported; None when it cannot be known
    problem: str
    # Under the skip policy: every skipped record as (kind, line, id, reason substring).
    skipped: tuple[tuple[str, int, object, str], ...]


def _truncate(split: RawSplit, line: int, keep: Callable[[int], int]) -> None:
    image_id = int(split.image_lines[line - 1].split("\t")[0])
    data = split.images[image_id]
    set_payload(split, line, b64(data[: keep(len(data))]))


CASES = [
    Case("bad_base64", lambda s: set_payload(s, 3, "iVBORw0KGgo!!notbase64"), "image", 3, 3, "invalid base64",
         (("image", 3, 3, "invalid base64"), ("text", 4, 13, "its image 3 was skipped"))),
    Case("not_an_image", lambda s: set_payload(s, 4, b64(b"this is not an image at all" * 20)), "image", 4, 4,
         "not an image", (("image", 4, 4, "not an image"), ("text", 5, 14, "its image 4 was skipped"))),
    Case("truncated_jpeg", lambda s: _truncate(s, 2, lambda n: n // 2), "image", 2, 2, "cannot be decoded",
         (("image", 2, 2, "cannot be decoded"), ("text", 3, 12, "its image 2 was skipped"))),
    # Only the IEND chunk is cut: decoding succeeds, verify() does not.
    Case("truncated_png_tail", lambda s: _truncate(s, 5, lambda n: n - 10), "image", 5, 5, "cannot be decoded",
         (("image", 5, 5, "cannot be decoded"), ("text", 6, 15, "its image 5 was skipped"),
          ("text", 7, 16, "skipped as a whole"))),
    Case("non_integer_image_id", lambda s: s.image_lines.__setitem__(5, "six\t" + s.image_lines[5].split("\t")[1]),
         "image", 6, "six", "is not an integer",
         (("image", 6, "six", "is not an integer"), ("text", 7, 16, "image id 6 does not exist"),
          ("text", 8, 17, "image id 6 does not exist"))),
    Case("duplicate_image_id", lambda s: s.image_lines.append("2\t" + b64(make_image("PNG", (8, 8), 99))),
         "image", 7, 2, "duplicate image id 2", (("image", 7, 2, "duplicate image id 2"),)),
    Case("invalid_json", lambda s: set_text(s, 3, '{"text_id": 12, "text": "broken'), "text", 3, None,
         "invalid JSON", (("text", 3, None, "invalid JSON"),)),
    Case("missing_field", lambda s: set_text(s, 5, {"text_id": 14, "text": "没有图片"}), "text", 5, 14,
         "missing field image_ids", (("text", 5, 14, "missing field image_ids"),)),
    Case("empty_text", lambda s: set_text(s, 2, {"text_id": 11, "text": "  \t ", "image_ids": [1]}), "text", 2, 11,
         "text is empty", (("text", 2, 11, "text is empty"),)),
    Case("non_integer_text_id", lambda s: set_text(s, 8, {"text_id": "17", "text": "文字", "image_ids": [6]}),
         "text", 8, "17", "text_id must be an integer", (("text", 8, "17", "text_id must be an integer"),)),
    Case("duplicate_text_id", lambda s: set_text(s, 8, {"text_id": 12, "text": "重复", "image_ids": [6]}),
         "text", 8, 12, "duplicate text id 12", (("text", 8, 12, "duplicate text id 12"),)),
    Case("unknown_image_id", lambda s: set_text(s, 1, {"text_id": 10, "text": "不存在", "image_ids": [999]}),
         "text", 1, 10, "image id 999 does not exist", (("text", 1, 10, "image id 999 does not exist"),)),
]


def _file_name(kind: str) -> str:
    return f"{SPLIT}_imgs.tsv" if kind == "image" else f"{SPLIT}_texts.jsonl"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_error_policy_names_file_line_id_and_problem(tmp_path: Path, case: Case) -> None:
    split = base_split()
    case.mutate(split)
    split.write(tmp_path / "src")
    out_dir = tmp_path / "out" / SPLIT
    out_dir.parent.mkdir()

    with pytest.raises(DataError) as info:
        serialize_split("raw_tsv", tmp_path / "src", SPLIT, out_dir, entry=ENTRY, progress=False)
    message = str(info.value)
    assert f"{_file_name(case.kind)}:{case.line}" in message
    assert case.problem in message
    if case.record_id is not None:
        shown = case.record_id if isinstance(case.record_id, int) else repr(case.record_id)
        assert f"{'image_id' if case.kind == 'image' else 'text_id'}={shown}" in message
    assert not out_dir.exists()
    assert list((tmp_path / "out").iterdir()) == []  # no temporary directory left behind

    # A previous build survives a failed rebuild untouched.
    out_dir.mkdir(parents=True)
    (out_dir / "previous.txt").write_text("previous build")
    with pytest.raises(DataError):
        serialize_split("raw_tsv", tmp_path / "src", SPLIT, out_dir, entry=ENTRY, progress=False)
    assert [p.name for p in out_dir.iterdir()] == ["previous.txt"]
    assert (out_dir / "previous.txt").read_text() == "previous build"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [SPLIT]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_skip_policy_reports_and_serializes_the_rest(tmp_path: Path, case: Case) -> None:
    split = base_split()
    case.mutate(split)
    split.write(tmp_path / "src")
    out_dir = tmp_path / "out" / SPLIT

    report = serialize_split("raw_tsv", tmp_path / "src", SPLIT, out_dir, entry=ENTRY,
                             on_bad_record="skip", progress=False)

    got = [(s.kind, s.line, s.id, s.reason) for s in report.skipped]
    assert len(got) == len(case.skipped), got
    for (kind, line, record_id, reason), expected in zip(got, case.skipped):
        assert (kind, line, record_id) == expected[:3]
        assert expected[3] in reason
    for s in report.skipped:
        assert Path(s.file).name == _file_name(s.kind)

    skipped_image_lines = {s.line for s in report.skipped if s.kind == "image"}
    skipped_text_lines = {s.line for s in report.skipped if s.kind == "text"}
    assert report.images_skipped == len(skipped_image_lines)
    assert report.texts_skipped == len(skipped_text_lines)
    assert report.images_read == len(split.image_lines)
    assert report.texts_read == len(split.text_lines)

    # The report on disk is the same report.
    on_disk = json.loads((out_dir / "validation_report.json").read_text(encoding="utf-8"))
    assert on_disk == report.to_dict()
    assert on_disk["policy"] == "skip"
    assert len(on_disk["skipped"]) == len(case.skipped)

    # Everything else is serialized with its original values.
    with SplitStore(out_dir) as store:
        kept_lines = [line for i, line in enumerate(split.text_lines, start=1) if i not in skipped_text_lines]
        expected_texts = [json.loads(line) for line in kept_lines]
        assert [t.to_dict() for t in store.texts()] == expected_texts
        expected_image_ids = [int(line.split("\t")[0]) for i, line in enumerate(split.image_lines, start=1)
                              if i not in skipped_image_lines]
        assert store.image_ids() == expected_image_ids
        for image_id in expected_image_ids:
            assert store.image_bytes(image_id) == split.images[image_id]
        assert store.num_pairs == sum(len(t["image_ids"]) for t in expected_texts) == report.pairs
    # The gold file has the raw jsonl's exact line shape.
    assert (out_dir / "texts.jsonl").read_text(encoding="utf-8") == "".join(line + "\n" for line in kept_lines)


def test_missing_field_leaves_image_unreferenced_but_kept(tmp_path: Path) -> None:
    split = base_split()
    set_text(split, 5, {"text_id": 14, "text": "没有图片"})
    split.write(tmp_path / "src")
    report = serialize_split("raw_tsv", tmp_path / "src", SPLIT, tmp_path / "out", entry=ENTRY,
                             on_bad_record="skip", progress=False)
    assert report.images_kept == 6
    assert report.images_unreferenced == 1
    assert report.to_dict()["counts"]["images"]["unreferenced"] == 1


def test_clean_split_counts(tmp_path: Path) -> None:
    split = base_split()
    split.write(tmp_path / "src")
    with read_source("raw_tsv", tmp_path / "src", SPLIT, ENTRY) as source:
        images, texts, report = validate_split(source, workers=2)
        kept = list(images)
    assert [r.image_id for r in kept] == list(IMAGE_FORMATS)
    assert all(r.data == split.images[r.image_id] for r in kept)
    assert [(t.text_id, list(t.image_ids)) for t in texts] == TEXTS
    counts = report.to_dict()["counts"]
    assert counts["images"] == {"read": 6, "kept": 6, "skipped": 0, "unreferenced": 0,
                                "bytes": sum(len(b) for b in split.images.values())}
    assert counts["texts"] == {"read": 8, "kept": 8, "skipped": 0}
    assert counts["pairs"] == 9
    assert report.skipped == []


def test_workers_do_not_change_results_or_first_error(tmp_path: Path) -> None:
    split = base_split()
    for image_id in range(7, 60):
        buffer = io.StringIO()
        raw.write_image_line(buffer, image_id, make_image("PNG", (10, 10), image_id))
        split.image_lines.append(buffer.getvalue().rstrip("\n"))
    set_payload(split, 40, "@@@")
    set_payload(split, 20, "###")
    split.write(tmp_path / "src")
    for workers in (1, 3):
        with read_source("raw_tsv", tmp_path / "src", SPLIT, ENTRY) as source:
            with pytest.raises(DataError, match=r"test_imgs\.tsv:20 \(image_id=20\)"):
                validate_split(source, workers=workers)
        with read_source("raw_tsv", tmp_path / "src", SPLIT, ENTRY) as source:
            images, _texts, report = validate_split(source, policy="skip", workers=workers)
            assert [s.line for s in report.skipped] == [20, 40]
            assert [r.image_id for r in images] == [i for i in range(1, 60) if i not in (20, 40)]


def test_nothing_left_is_an_error_even_when_skipping(tmp_path: Path) -> None:
    split = base_split()
    split.text_lines = ['{"text_id": 1, "text": "x", "image_ids": [404]}']
    split.write(tmp_path / "src")
    with pytest.raises(DataError, match="no valid text remains"):
        serialize_split("raw_tsv", tmp_path / "src", SPLIT, tmp_path / "out", entry=ENTRY,
                        on_bad_record="skip", progress=False)
    assert not (tmp_path / "out").exists()


def test_min_image_side(tmp_path: Path) -> None:
    split = base_split()
    split.write(tmp_path / "src")
    with read_source("raw_tsv", tmp_path / "src", SPLIT, ENTRY) as source:
        with pytest.raises(DataError, match=r"test_imgs\.tsv:1 \(image_id=1\): image is 25x20, smaller than"):
            validate_split(source, min_image_side=21)


def test_text_field_types_and_repeats(tmp_path: Path) -> None:
    split = base_split()
    set_text(split, 1, {"text_id": 10, "text": "a", "image_ids": []})
    set_text(split, 2, {"text_id": 11, "text": "b", "image_ids": [1, 1]})
    set_text(split, 3, {"text_id": 12, "text": 5, "image_ids": [2]})
    set_text(split, 4, {"text_id": 13, "text": "d", "image_ids": ["3"]})
    set_text(split, 5, {"text_id": True, "text": "e", "image_ids": [4]})
    set_text(split, 6, "[1, 2, 3]")
    split.write(tmp_path / "src")
    with read_source("raw_tsv", tmp_path / "src", SPLIT, ENTRY) as source:
        _images, texts, report = validate_split(source, policy="skip")
    reasons = {s.line: s.reason for s in report.skipped}
    assert "non-empty list" in reasons[1]
    assert "more than once" in reasons[2]
    assert "text must be a string" in reasons[3]
    assert "image_ids must be integers" in reasons[4]
    assert "text_id must be an integer" in reasons[5]
    assert "expected a JSON object" in reasons[6]
    assert [t.text_id for t in texts] == [16, 17]


def test_unknown_policy_is_rejected(tmp_path: Path) -> None:
    base_split().write(tmp_path / "src")
    assert POLICIES == ("error", "skip")
    with read_source("raw_tsv", tmp_path / "src", SPLIT, ENTRY) as source:
        with pytest.raises(ValueError, match="policy"):
            validate_split(source, policy="ignore")


def test_source_changed_between_passes_is_detected(tmp_path: Path) -> None:
    split = base_split()
    root = split.write(tmp_path / "src")
    with read_source("raw_tsv", tmp_path / "src", SPLIT, ENTRY) as source:
        images, _texts, _report = validate_split(source)
        split.image_lines[2] = "3\t" + b64(make_image("PNG", (9, 9), 1234))
        split.write(tmp_path / "src")
        with pytest.raises(DataError, match="changed"):
            list(images)
    assert root.is_dir()


def test_helpers() -> None:
    png = make_image("PNG", (4, 3), 0)
    assert decode_base64(b64(png)) == (png, None)
    assert decode_base64("")[1] == "empty base64 payload"
    assert "invalid base64" in decode_base64("abcde")[1]  # no base64 has this length
    assert "invalid base64" in decode_base64("ab=")[1]  # padding to no multiple of 4
    assert decode_base64("abc") == decode_base64("abc=") == (b"i\xb7", None)  # padded or not
    assert "invalid base64" in decode_base64(b64(png)[:8] + "\n" + b64(png)[8:])[1]  # no line breaks
    assert check_image_bytes(png) is None
    assert "smaller than" in check_image_bytes(png, min_image_side=4)
    # A format Pillow can read but that has no business in a dataset is refused.
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, "PPM")
    assert "not an image in a supported format" in check_image_bytes(buffer.getvalue())
