"""Feature sets on disk: the memory-mappable directory format and the reference jsonl."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vlretrieval.errors import DataError
from vlretrieval.retrieval.features import (
    FeatureSet,
    export_reference_jsonl,
    l2_normalize,
    load_any_features,
    load_features,
    read_reference_jsonl,
    save_features,
    validate_features,
)


def unit_set(n: int = 30, dim: int = 12, seed: int = 0) -> FeatureSet:
    rng = np.random.default_rng(seed)
    return FeatureSet(rng.permutation(n).astype(np.int64) * 5 + 1, l2_normalize(rng.standard_normal((n, dim))))


def write_raw_dir(path, ids, vectors, **meta) -> None:
    """A feature directory written without save_features' checks, to test what load rejects."""
    path.mkdir()
    np.save(path / "ids.npy", ids)
    np.save(path / "vectors.npy", vectors)
    meta = {"format": "vlretrieval.features", "version": 1, "count": len(ids), "dim": vectors.shape[1],
            "kind": None, **meta}
    (path / "meta.json").write_text(json.dumps(meta))


# ---------------------------------------------------------------------------------------------
# l2_normalize and FeatureSet


def test_l2_normalize():
    x = np.array([[3, 4], [0, -2], [1e-30, 0]], dtype=np.float64)
    y = l2_normalize(x)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, [[0.6, 0.8], [0, -1], [1, 0]], rtol=1e-7)
    with pytest.raises(ValueError, match="row 1 is all zeros"):
        l2_normalize(np.array([[1.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="row 0 has non-finite"):
        l2_normalize(np.array([[np.nan, 1.0]]))


def test_feature_set_checks_shapes_and_dtypes():
    fs = FeatureSet(np.arange(3, dtype=np.int32), np.zeros((3, 2), dtype=np.float32))
    assert fs.ids.dtype == np.int64 and len(fs) == 3 and fs.dim == 2
    with pytest.raises(ValueError, match="float32"):
        FeatureSet(np.arange(3), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="3 ids for 4 vectors"):
        FeatureSet(np.arange(3), np.zeros((4, 2), dtype=np.float32))
    with pytest.raises(ValueError, match="integer"):
        FeatureSet(np.array([True, False]), np.zeros((2, 2), dtype=np.float32))
    with pytest.raises(ValueError, match="does not fit into int64"):
        FeatureSet(np.array([2**63], dtype=np.uint64), np.zeros((1, 2), dtype=np.float32))
    assert FeatureSet(np.array([7], dtype=np.uint64), np.zeros((1, 2), dtype=np.float32)).ids.tolist() == [7]


# ---------------------------------------------------------------------------------------------
# directory format


def test_save_load_round_trip_memory_mapped(tmp_path):
    fs = unit_set()
    save_features(tmp_path / "feats", fs, kind="image")
    assert sorted(p.name for p in (tmp_path / "feats").iterdir()) == ["ids.npy", "meta.json", "vectors.npy"]
    loaded = load_features(tmp_path / "feats")
    assert isinstance(loaded.vectors, np.memmap) and not loaded.vectors.flags.writeable
    np.testing.assert_array_equal(loaded.ids, fs.ids)
    np.testing.assert_array_equal(loaded.vectors, fs.vectors)
    in_memory = load_features(tmp_path / "feats", mmap=False)
    assert not isinstance(in_memory.vectors, np.memmap)
    np.testing.assert_array_equal(in_memory.vectors, fs.vectors)
    assert load_any_features(tmp_path / "feats", "image").dim == fs.dim


def test_save_replaces_existing_directory_atomically(tmp_path):
    save_features(tmp_path / "feats", unit_set(30))
    save_features(tmp_path / "feats", unit_set(10, seed=1))
    assert len(load_features(tmp_path / "feats")) == 10
    assert [p.name for p in tmp_path.iterdir()] == ["feats"]  # no temporaries left behind


def test_save_refuses_invalid_sets_and_writes_nothing(tmp_path):
    fs = unit_set()
    with pytest.raises(DataError, match=r"row 0 has L2 norm 2"):
        save_features(tmp_path / "feats", FeatureSet(fs.ids, fs.vectors * 2))
    assert not (tmp_path / "feats").exists()


def test_kind_mismatch_is_reported(tmp_path):
    save_features(tmp_path / "feats", unit_set(), kind="text")
    with pytest.raises(DataError, match="holds text features, expected image features"):
        load_features(tmp_path / "feats", kind="image")


def test_load_rejects_unnormalised_rows_naming_file_and_id(tmp_path):
    fs = unit_set()
    vectors = fs.vectors.copy()
    vectors[7] *= 1.5
    write_raw_dir(tmp_path / "feats", fs.ids, vectors)
    with pytest.raises(DataError) as err:
        load_features(tmp_path / "feats")
    message = str(err.value)
    assert "vectors.npy" in message and f"id={fs.ids[7]}" in message and "row 7 has L2 norm 1.5" in message


def test_load_rejects_nan(tmp_path):
    fs = unit_set()
    vectors = fs.vectors.copy()
    vectors[3, 1] = np.nan
    write_raw_dir(tmp_path / "feats", fs.ids, vectors, kind="image")
    with pytest.raises(DataError, match=rf"vectors.npy \(image_id={fs.ids[3]}\): row 3 has NaN"):
        load_features(tmp_path / "feats")


def test_load_rejects_duplicate_ids(tmp_path):
    fs = unit_set()
    ids = fs.ids.copy()
    ids[9] = ids[2]
    write_raw_dir(tmp_path / "feats", ids, fs.vectors)
    with pytest.raises(DataError, match=rf"id={ids[2]}\): duplicate id: rows 2 and 9"):
        load_features(tmp_path / "feats")


@pytest.mark.parametrize("case", ["ids_length", "float64", "meta_count", "no_meta", "not_dir"])
def test_load_rejects_malformed_directories(tmp_path, case):
    fs = unit_set()
    path = tmp_path / "feats"
    if case == "ids_length":
        write_raw_dir(path, fs.ids[:-1], fs.vectors, count=len(fs))
        match = "29 ids for 30 vectors"
    elif case == "float64":
        write_raw_dir(path, fs.ids, fs.vectors.astype(np.float64))
        match = "float32"
    elif case == "meta_count":
        write_raw_dir(path, fs.ids, fs.vectors, count=31)
        match = "records 31 x 12"
    elif case == "no_meta":
        write_raw_dir(path, fs.ids, fs.vectors)
        (path / "meta.json").unlink()
        match = "meta.json: missing"
    else:
        path.write_text("not a directory")
        match = "not a feature directory"
    with pytest.raises(DataError, match=match):
        load_features(path)


def test_validation_of_large_sets_reads_in_blocks(tmp_path):
    # More rows than one validation block, with the bad row in a later block.
    rng = np.random.default_rng(3)
    vectors = l2_normalize(rng.standard_normal((20_000, 4)))
    vectors[19_999] = 0.0
    fs = FeatureSet(np.arange(20_000), vectors)
    with pytest.raises(DataError, match=r"\(id=19999\): row 19999 has L2 norm 0"):
        validate_features(fs, "memory")


# ---------------------------------------------------------------------------------------------
# reference jsonl


@pytest.mark.parametrize("kind,key", [("image", "image_id"), ("text", "text_id")])
def test_reference_jsonl_round_trip(tmp_path, kind, key):
    fs = unit_set()
    path = tmp_path / f"x.{kind[:3]}_feat.jsonl"
    export_reference_jsonl(fs, path, kind)
    lines = path.read_text().splitlines()
    assert len(lines) == len(fs)
    first = json.loads(lines[0])
    assert list(first) == [key, "feature"] and first[key] == int(fs.ids[0])
    assert np.array_equal(np.array(first["feature"], dtype=np.float32), fs.vectors[0])  # exact float32 repr
    back = read_reference_jsonl(path, kind)
    np.testing.assert_array_equal(back.ids, fs.ids)
    np.testing.assert_allclose(back.vectors, fs.vectors, rtol=0, atol=2e-7)
    np.testing.assert_array_equal(load_any_features(path, kind).ids, fs.ids)


def test_reference_jsonl_is_normalised_on_read(tmp_path):
    path = tmp_path / "x.img_feat.jsonl"
    path.write_text('{"image_id": 4, "feature": [3, 4]}\n{"image_id": 9, "feature": [0.0, -0.5]}\n')
    fs = read_reference_jsonl(path, "image")
    assert fs.ids.tolist() == [4, 9]
    np.testing.assert_allclose(fs.vectors, [[0.6, 0.8], [0.0, -1.0]], rtol=1e-7)
    validate_features(fs, path)


@pytest.mark.parametrize("line,problem", [
    ('{"image_id": 2, "feature": [NaN, 1.0]}', "NaN or infinite"),
    ('{"image_id": 2, "feature": [0.0, 0.0]}', "zero"),
    ('{"image_id": 2, "feature": [1.0]}', "has 1 values, earlier lines have 2"),
    ('{"image_id": 2, "feature": ["1.0", 2.0]}', "flat list of numbers"),
    ('{"image_id": 2, "feature": []}', "non-empty list"),
    ('{"image_id": true, "feature": [1.0, 2.0]}', "image_id must be an integer"),
    ('{"image_id": "2", "feature": [1.0, 2.0]}', "image_id must be an integer"),
    ('{"text_id": 2, "feature": [1.0, 2.0]}', "image_id must be an integer"),
    ('{"image_id": 1, "feature": [1.0, 2.0]}', "duplicate image_id, first seen on line 1"),
    ('{"image_id": 2, "feature": [1.0, 2.0]', "invalid JSON"),
    ("", "blank line"),
])
def test_reference_jsonl_errors_name_file_and_line(tmp_path, line, problem):
    path = tmp_path / "x.img_feat.jsonl"
    path.write_text('{"image_id": 1, "feature": [1.0, 2.0]}\n' + line + "\n")
    with pytest.raises(DataError, match=problem) as err:
        read_reference_jsonl(path, "image")
    assert str(err.value).startswith(f"{path}:2")


def test_unknown_kind(tmp_path):
    with pytest.raises(ValueError, match="kind"):
        export_reference_jsonl(unit_set(), tmp_path / "x.jsonl", "audio")
