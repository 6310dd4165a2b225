"""ViLT-style Arrow files: exact round trip, ViLT-written files, schema errors, memory mapping,
atomicity and the workflow rule."""

from __future__ import annotations

import io
import json
import pickle
import random
import shutil
from pathlib import Path

import lmdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from vlretrieval.data import raw
from vlretrieval.data.arrow_store import VILT_COLUMNS, ArrowRow, ArrowSplit, serialize_arrow
from vlretrieval.data.lmdb_store import SplitStore, serialize_split
from vlretrieval.errors import DataError

from .conftest import make_image, tiny_demo_entry

ENTRY = {"root": "Demo-CN"}


def write_raw_split(source_dir: Path, split: str = "test", n_images: int = 11, side: int = 16) -> None:
    """Sparse unordered ids, PNG and JPEG, a text naming two images and one image no text names."""
    rng = random.Random(5)
    image_ids = rng.sample(range(100, 100_000), n_images)
    root = source_dir / ENTRY["root"]
    root.mkdir(parents=True, exist_ok=True)
    with open(raw.images_tsv_path(root, split), "w", encoding="utf-8") as handle:
        for k, image_id in enumerate(image_ids):
            raw.write_image_line(handle, image_id, make_image("PNG" if k % 2 else "JPEG", (side + k, side), seed=k))
    text_ids = rng.sample(range(10_000), 3 * (n_images - 1))
    with open(raw.texts_jsonl_path(root, split), "w", encoding="utf-8") as handle:
        for k, text_id in enumerate(text_ids):
            named = [image_ids[k % (n_images - 1)]]  # the last image is named by no text
            if k == 4:
                named.append(image_ids[(k + 3) % (n_images - 1)])
            raw.write_text_line(handle, text_id, f"第{k}条描述 \"quoted\" \u2028 end", named)


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("arrow")
    write_raw_split(base / "src")
    out = base / "lmdb" / "test"
    serialize_split("raw_tsv", base / "src", "test", out, entry=ENTRY, progress=False)
    return out


def expected_rows(split_dir: Path) -> list[ArrowRow]:
    with SplitStore(split_dir) as store:
        texts = store.texts()
        rows = []
        for image_id in store.image_ids():
            mine = [t for t in texts if image_id in t.image_ids]
            rows.append(ArrowRow(store.image_bytes(image_id), [t.text for t in mine], str(image_id), "test",
                                 [t.text_id for t in mine]))
    return rows


def test_round_trip_exact_values(split_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "arrow" / "test"
    manifest = serialize_arrow(split_dir, out, name="demo", batch_rows=4, progress=False)
    expected = expected_rows(split_dir)
    assert sorted(p.name for p in out.iterdir()) == ["demo_test.arrow", "manifest.json"]
    assert manifest == json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert (manifest["images"], manifest["record_batches"], manifest["images_without_captions"]) == (11, 3, 1)
    assert manifest["captions"] == sum(len(r.captions) for r in expected) == 31  # 30 texts, one names two images

    with pytest.raises(DataError, match=r"demo_test\.arrow \(row 10\): column 'caption' is an empty list"):
        ArrowSplit(out)
    with ArrowSplit(out / "demo_test.arrow", allow_empty_captions=True) as data:
        assert len(data) == data.num_images == 11 and data.has_text_ids
        assert [data.row(i) for i in range(len(data))] == expected
        assert list(data) == expected
        assert data.image_ids() == [r.image_id for r in expected]
        for i, row in enumerate(expected):
            assert data.image_bytes(i) == row.image == data.image_buffer(i).to_pybytes()
            assert data.captions(i) == row.captions and data.text_ids(i) == row.text_ids
            assert data.image_id(i) == row.image_id and data.split(i) == "test"
            assert data.open_image(i).mode == "RGB"
        mapper = [(i, c) for i, row in enumerate(expected) for c in range(len(row.captions))]
        assert data.index_mapper == mapper and data.num_captions == 31
        assert [data.caption(k) for k in range(31)] == [expected[i].captions[c] for i, c in mapper]
        with pytest.raises(IndexError):
            data.image_bytes(11)
        clone = pickle.loads(pickle.dumps(data))
        assert clone.row(3) == expected[3]
        clone.close()


def test_vilt_readers_see_the_four_columns(split_dir: Path, tmp_path: Path) -> None:
    """What ViLT's and BridgeTower's BaseDataset do with a file: select columns by name."""
    serialize_arrow(split_dir, tmp_path / "out", name="f30k_caption_karpathy", progress=False)
    path = tmp_path / "out" / "f30k_caption_karpathy_test.arrow"
    table = pa.ipc.RecordBatchFileReader(pa.memory_map(str(path), "r")).read_all()
    table = pa.concat_tables([table], promote_options="default")
    assert table.schema.names[:4] == list(VILT_COLUMNS)
    types = [str(table.schema.field(c).type) for c in VILT_COLUMNS]
    assert types == ["binary", "list<item: string>", "string", "string"]
    expected = expected_rows(split_dir)
    all_texts = table["caption"].to_pandas().tolist()
    assert [list(t) for t in all_texts] == [r.captions for r in expected]
    assert table["image"][5].as_py() == expected[5].image
    assert table["image_id"][5].as_py() == expected[5].image_id


def vilt_file(path: Path, rows: list[list], columns: list[str] = list(VILT_COLUMNS)) -> Path:
    """An Arrow file written exactly as ViLT's write_*_karpathy.py scripts do."""
    dataframe = pd.DataFrame(rows, columns=columns)
    table = pa.Table.from_pandas(dataframe)
    path.parent.mkdir(parents=True, exist_ok=True)
    with pa.OSFile(str(path), "wb") as sink:
        with pa.RecordBatchFileWriter(sink, table.schema) as writer:
            writer.write_table(table)
    return path


def vilt_rows(n: int = 6, seed: int = 0) -> list[list]:
    return [[make_image("JPEG", (20, 18), seed=seed + i), [f"a photo {i}.{c}" for c in range(1 + i % 3)],
             f"{1000 + i}.jpg", "test"] for i in range(n)]


def test_reads_a_vilt_written_file(tmp_path: Path) -> None:
    rows = vilt_rows()
    path = vilt_file(tmp_path / "coco_caption_karpathy_test.arrow", rows)
    with ArrowSplit(path, check_images=True) as data:
        assert len(data) == 6 and not data.has_text_ids
        for i, (image, captions, image_id, split) in enumerate(rows):
            assert data.row(i) == ArrowRow(image, captions, image_id, split, None)
        assert data.index_mapper == [(i, c) for i, r in enumerate(rows) for c in range(len(r[1]))]

    # Visual Genome style: integer ids and no split column.
    vg = vilt_file(tmp_path / "vg" / "vg.arrow", [[r[0], r[1], 7 + i] for i, r in enumerate(rows)],
                   ["image", "caption", "image_id"])
    with ArrowSplit(vg) as data:
        assert pa.types.is_integer(pa.ipc.open_file(pa.memory_map(str(vg))).schema.field("image_id").type)
        assert data.image_ids() == [str(7 + i) for i in range(6)] and data.split(0) is None


def test_directory_of_shards_reads_as_one_table(tmp_path: Path) -> None:
    first, second = vilt_rows(4), vilt_rows(3, seed=10)
    vilt_file(tmp_path / "cc" / "cc_0.arrow", first)
    vilt_file(tmp_path / "cc" / "cc_1.arrow", second)
    with ArrowSplit(tmp_path / "cc") as data:
        assert [p.name for p in data.files] == ["cc_0.arrow", "cc_1.arrow"]
        assert [data.image_bytes(i) for i in range(7)] == [r[0] for r in first + second]
        assert data.pair(data.num_captions - 1) == (6, len(second[-1][1]) - 1)


def _table_file(path: Path, columns: dict) -> Path:
    table = pa.table(columns)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return path


GOOD = make_image("PNG", (12, 12), seed=1)


@pytest.mark.parametrize(
    "columns, options, message",
    [
        ({"image": [GOOD], "image_id": ["1"], "split": ["test"]}, {},
         r"missing column 'caption' \(found \['image', 'image_id', 'split'\]\)"),
        ({"image": ["not bytes"], "caption": [["a"]], "image_id": ["1"]}, {},
         r"column 'image' has type string, expected binary"),
        ({"image": [GOOD], "caption": ["one caption"], "image_id": ["1"]}, {},
         r"column 'caption' has type string, expected list<string> \(one caption per row"),
        ({"image": [GOOD], "caption": [[1, 2]], "image_id": ["1"]}, {},
         r"column 'caption' has type list<item: int64>, expected list<string>"),
        ({"image": [GOOD], "caption": [["a"]], "image_id": [1.5]}, {},
         r"column 'image_id' has type double, expected string or integer"),
        ({"image": [GOOD, GOOD], "caption": [["a"], []], "image_id": ["1", "2"]}, {},
         r"\(row 1\): column 'caption' is an empty list"),
        ({"image": [GOOD, GOOD], "caption": [["a"], ["b", None]], "image_id": ["1", "2"]}, {},
         r"\(row 1\): column 'caption' holds a null caption"),
        ({"image": [GOOD, None], "caption": [["a"], ["b"]], "image_id": ["1", "2"]}, {},
         r"\(row 1\): column 'image' is null"),
        ({"image": [GOOD, GOOD, GOOD[:60]], "caption": [["a"], ["b"], ["c"]], "image_id": ["1", "2", "3"]},
         {"check_images": True}, r"\(row 2\): column 'image' does not hold a usable image"),
        ({"image": [GOOD], "caption": [["a", "b"]], "image_id": ["1"], "text_ids": [[5]]}, {},
         r"\(row 0\): column 'text_ids' does not have one id per caption"),
    ],
    ids=["missing", "image_type", "caption_string", "caption_ints", "id_type", "empty", "null_caption",
         "null_image", "undecodable", "text_ids"],
)
def test_schema_errors_name_file_column_and_row(tmp_path: Path, columns: dict, options: dict, message: str) -> None:
    path = _table_file(tmp_path / "bad.arrow", columns)
    with pytest.raises(DataError, match=message) as info:
        ArrowSplit(path, **options)
    assert str(info.value).startswith(str(path))


def test_undecodable_image_passes_without_the_check_and_garbage_is_named(tmp_path: Path) -> None:
    path = _table_file(tmp_path / "lazy.arrow", {"image": [b"\xff\xd8 broken"], "caption": [["a"]], "image_id": ["1"]})
    with ArrowSplit(path) as data:  # decoding is opt-in: it reads every image
        assert data.image_bytes(0) == b"\xff\xd8 broken"
    (tmp_path / "junk.arrow").write_bytes(b"PAR1 not arrow at all")
    with pytest.raises(DataError, match=r"junk\.arrow: not an Arrow IPC file"):
        ArrowSplit(tmp_path / "junk.arrow")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no \.arrow file"):
        ArrowSplit(tmp_path / "empty")


def test_reading_is_memory_mapped(tmp_path: Path) -> None:
    rng = random.Random(3)
    images = [rng.randbytes(64 << 10) for _ in range(48)]  # 3 MB that the reader must not copy into Arrow memory
    path = vilt_file(tmp_path / "big_test.arrow", [[d, ["c"], str(i), "test"] for i, d in enumerate(images)])
    before = pa.total_allocated_bytes()
    with ArrowSplit(path) as data:
        opened = pa.total_allocated_bytes()
        order = list(range(len(data)))
        rng.shuffle(order)
        peak = 0
        for i in order:
            assert data.image_bytes(i) == images[i]
            assert bytes(data.image_buffer(i)) == images[i]
            peak = max(peak, pa.total_allocated_bytes() - before)
    assert opened - before < 64 << 10
    assert peak < 64 << 10, f"{peak} bytes of Arrow memory for {sum(map(len, images))} bytes of images"


def test_failed_write_leaves_no_output(split_dir: Path, tmp_path: Path) -> None:
    damaged = tmp_path / "damaged"
    shutil.copytree(split_dir, damaged)
    with SplitStore(damaged) as store:
        victim = store.image_ids()[7]
    env = lmdb.open(str(damaged / "imgs"), lock=False)
    with env.begin(write=True) as txn:
        assert txn.delete(str(victim).encode())
    env.close()

    out = tmp_path / "arrow" / "test"
    with pytest.raises(KeyError, match=str(victim)):
        serialize_arrow(damaged, out, name="demo", batch_rows=2, progress=False)
    assert not out.exists() and list(out.parent.iterdir()) == []

    serialize_arrow(split_dir, out, name="demo", progress=False)
    before = (out / "demo_test.arrow").read_bytes()
    with pytest.raises(KeyError):
        serialize_arrow(damaged, out, name="demo", batch_rows=2, progress=False)
    assert (out / "demo_test.arrow").read_bytes() == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["test"]


@pytest.mark.slow
def test_workflow_builds_the_arrow_split(workflow) -> None:
    workflow.write_config(
        {"grid": {"datasets": ["demo_tiny"], "models": ["ernie_vil"]}},
        datasets={"demo_tiny": tiny_demo_entry({"test": 6})},
    )
    workflow.run("resources/demo_tiny/arrow/test")
    root = workflow.workdir / "resources" / "demo_tiny"
    # Snakemake adds its .snakemake_timestamp to directory outputs; the reader globs *.arrow only.
    files = sorted(p.name for p in (root / "arrow" / "test").iterdir() if not p.name.startswith("."))
    assert files == ["demo_tiny_test.arrow", "manifest.json"]
    with SplitStore(root / "lmdb" / "test") as store, ArrowSplit(root / "arrow" / "test", check_images=True) as data:
        assert data.image_ids() == [str(i) for i in store.image_ids()]
        assert data.num_captions == store.num_pairs == 30
        assert data.image_bytes(5) == store.image_bytes(store.image_ids()[5])
        assert sorted(t for i in range(len(data)) for t in data.text_ids(i)) == sorted(store.text_ids())
    assert (workflow.workdir / "logs" / "serialize_arrow" / "demo_tiny" / "test.log").is_file()
    assert (workflow.workdir / "benchmarks" / "serialize_arrow" / "demo_tiny" / "test.tsv").is_file()
    # Up to date: a second run leaves the file alone.
    arrow_file = root / "arrow" / "test" / "demo_tiny_test.arrow"
    stamp = arrow_file.stat().st_mtime_ns
    workflow.run("resources/demo_tiny/arrow/test")
    assert arrow_file.stat().st_mtime_ns == stamp
