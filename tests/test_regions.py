"""Region features and object tags: VinVL tsv readers, the region store, demo regions, the workflow rule."""

from __future__ import annotations

import base64
import io
import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from vlretrieval.data import demo, regions
from vlretrieval.data.demo import DemoSpec, write_demo_archive
from vlretrieval.data.lmdb_store import SplitStore, serialize_split
from vlretrieval.data.regions import (
    FEATURE_DIM,
    RegionStore,
    box_features,
    decode_features,
    iter_feature_rows,
    serialize_regions,
)
from vlretrieval.errors import DataError

from .conftest import REPO, make_image, tiny_demo_entry

# sha256 of the demo_cn archive before region data and caption languages existed.
DEMO_CN_SHA256 = "154d666d05804bb2fa0fabcecb1cc1b69913fb7cc3927e7d8624bb40c049ec95"


# --------------------------------------------------------------------------------------------
# helpers writing official-format files


def feature_line(image_id, array, num_boxes=None) -> str:
    payload = base64.b64encode(np.asarray(array, dtype="<f4").tobytes()).decode("ascii")
    n = array.shape[0] if num_boxes is None else num_boxes
    return f"{image_id}\t{n}\t{payload}\n"


def prediction_line(image_id, classes, w=640, h=480) -> str:
    objects = [{"class": c, "rect": [1.5 * i, 2.0, 10.0 + i, 20.25], "conf": 0.5 + 0.1 * i} for i, c in enumerate(classes)]
    return f"{image_id}\t{json.dumps({'image_h': h, 'image_w': w, 'num_boxes': len(objects), 'objects': objects})}\n"


def write_sources(tmp: Path, arrays: dict[int, np.ndarray], tags: dict[int, list[str]], lineidx: bool = True):
    features = tmp / "features.tsv"
    lines = [feature_line(i, a) for i, a in arrays.items()]
    features.write_text("".join(lines), encoding="ascii")
    if lineidx:
        offsets, offset = [], 0
        for line in lines:
            offsets.append(offset)
            offset += len(line)
        (tmp / "features.lineidx").write_text("".join(f"{o}\n" for o in offsets))
    predictions = tmp / "predictions.tsv"
    predictions.write_text("".join(prediction_line(i, t) for i, t in tags.items()), encoding="utf-8")
    return features, predictions


def random_arrays(ids, seed=0, boxes=(3, 0, 5)):
    rng = np.random.default_rng(seed)
    return {i: rng.standard_normal((boxes[k % len(boxes)], FEATURE_DIM)).astype(np.float32) for k, i in enumerate(ids)}


# --------------------------------------------------------------------------------------------
# readers and store


def test_box_features_follow_the_vinvl_convention():
    values = box_features([[10, 20, 50, 80]], 100, 200)
    assert values.dtype == np.float32
    np.testing.assert_allclose(values[0], [0.1, 0.1, 0.5, 0.4, 0.4, 0.3], rtol=1e-6)


def test_round_trip_tsv_to_store_is_exact(tmp_path):
    ids = [7, 3, 11]
    arrays = random_arrays(ids)
    tags = {7: ["dog", "frisbee"], 3: [], 11: ["man", "hat", "street"]}
    features, predictions = write_sources(tmp_path, arrays, tags)
    report = serialize_regions(features, predictions, ids, tmp_path / "out", split="test",
                               lineidx=tmp_path / "features.lineidx")
    assert report.images == 3 and report.boxes == 8 and not report.skipped
    assert json.loads((tmp_path / "out" / regions.REPORT_FILE).read_text())["images"] == 3
    with RegionStore(tmp_path / "out") as store:
        assert store.image_ids() == ids and len(store) == 3 and 7 in store and 8 not in store
        for i in ids:
            got = store.features(i)
            assert got.dtype == np.float32 and got.shape == arrays[i].shape
            assert np.array_equal(got, arrays[i])
            assert store.tags(i) == tags[i]
        record = store.get(11)
        assert (record.image_w, record.image_h) == (640, 480)
        np.testing.assert_array_equal(record.boxes[1], np.float32([1.5, 2.0, 11.0, 20.25]))
        np.testing.assert_allclose(record.conf, [0.5, 0.6, 0.7], rtol=1e-6)
        with pytest.raises(KeyError, match="image id 8"):
            store.features(8)
        # A store handed to a worker pickles as its path and reopens there.
        clone = pickle.loads(pickle.dumps(store))
        assert np.array_equal(clone.features(7), arrays[7])
        clone.close()


def test_shared_file_passes_over_other_splits(tmp_path):
    arrays = random_arrays([1, 2, 3, 4])
    features, predictions = write_sources(tmp_path, arrays, {i: ["x"] for i in arrays}, lineidx=False)
    report = serialize_regions(features, predictions, [2, 4], tmp_path / "out", split="valid", shared=True)
    assert report.other_images == 4 and report.images == 2
    with RegionStore(tmp_path / "out") as store:
        assert store.image_ids() == [2, 4]


def test_a_shared_features_file_does_not_relax_a_per_split_predictions_file(tmp_path):
    arrays = random_arrays([1, 2, 3])
    features, predictions = write_sources(tmp_path, arrays, {1: ["a"], 2: ["b"], 3: ["c"]}, lineidx=False)
    with pytest.raises(DataError, match=r"tags for image 3, which is not in the test split"):
        serialize_regions(features, predictions, [1, 2], tmp_path / "out", split="test",
                          shared=True, predictions_shared=False)
    report = serialize_regions(features, predictions, [1, 2], tmp_path / "out", split="test",
                               shared=False, predictions_shared=True, on_bad_record="skip")
    assert [s["location"] for s in report.skipped] == [f"{features}:3"]  # only the per-split file's row
    assert report.other_images == 1


def test_unknown_image_in_a_split_file_is_a_bad_record(tmp_path):
    arrays = random_arrays([1, 2, 9])
    features, predictions = write_sources(tmp_path, arrays, {1: ["a"], 2: ["b"]}, lineidx=False)
    with pytest.raises(DataError, match=r"features\.tsv:3 \(image_id=9\): features for image 9, which is not in the test split"):
        serialize_regions(features, predictions, [1, 2], tmp_path / "out", split="test")
    assert not (tmp_path / "out").exists()
    report = serialize_regions(features, predictions, [1, 2], tmp_path / "out", split="test", on_bad_record="skip")
    assert [s["location"] for s in report.skipped] == [f"{features}:3"]
    assert RegionStore(tmp_path / "out").image_ids() == [1, 2]


def _corrupt(kind: str, tmp: Path):
    """Sources for image ids [1, 2] with one defect; returns (features, predictions, lineidx, expected message)."""
    arrays = random_arrays([1, 2], boxes=(2,))
    tags = {1: ["a"], 2: ["b"]}
    features, predictions = write_sources(tmp, arrays, tags, lineidx=(kind == "lineidx"))
    lineidx = None
    good = feature_line(1, arrays[1])
    if kind == "dim":
        features.write_text(good + feature_line(2, np.zeros((2, 2048), np.float32)))
        message = r"features\.tsv:2 \(image_id=2\): feature dimension is 2048, expected 2054"
    elif kind == "num_boxes":
        features.write_text(good + feature_line(2, arrays[2], num_boxes=3))
        message = r"features\.tsv:2 \(image_id=2\): num_boxes is 3 but the features hold 4108 float32 values"
    elif kind == "num_boxes_whole":
        features.write_text(good + feature_line(2, arrays[2], num_boxes=1))
        message = r"num_boxes is 1 but the features hold 2 boxes of 2054 values"
    elif kind == "base64":
        features.write_text(good + "2\t2\tnot*base64\n")
        message = r"features\.tsv:2 \(image_id=2\): features are not valid base64"
    elif kind == "fields":
        features.write_text(good + "2\t2\n")
        message = r"features\.tsv:2 \(image_id=2\): expected 3 tab-separated fields"
    elif kind == "nan":
        bad = arrays[2].copy()
        bad[1, 5] = np.nan
        features.write_text(good + feature_line(2, bad))
        message = r"features contain NaN or infinite values"
    elif kind == "lineidx":
        (tmp / "features.lineidx").write_text("0\n7\n")
        lineidx = tmp / "features.lineidx"
        message = r"features\.tsv:2: .*features\.lineidx gives offset 7 for this line, which starts at byte"
    elif kind == "missing_features":
        features.write_text(good)
        message = r"features\.tsv: no features for 1 image\(s\) of the test split: 2"
    elif kind == "missing_tags":
        predictions.write_text(prediction_line(1, ["a"]))
        message = r"predictions\.tsv: no tags for 1 image\(s\) of the test split: 2"
    elif kind == "duplicate":
        features.write_text(good + feature_line(2, arrays[2]) + good)
        message = r"features\.tsv:3 \(image_id=1\): features for image 1 given again \(first at .*features\.tsv:1\)"
    elif kind == "bad_json":
        predictions.write_text(prediction_line(1, ["a"]) + "2\t{not json\n")
        message = r"predictions\.tsv:2 \(image_id=2\): invalid JSON"
    elif kind == "no_class":
        predictions.write_text(prediction_line(1, ["a"]) + '2\t{"image_w": 5, "image_h": 5, "objects": [{"rect": [0, 0, 1, 1]}]}\n')
        message = r"predictions\.tsv:2 \(image_id=2\): object 0 has no class name"
    elif kind == "no_objects":
        predictions.write_text(prediction_line(1, ["a"]) + '2\t{"image_w": 5, "image_h": 5}\n')
        message = r"predictions\.tsv:2 \(image_id=2\): the JSON has no 'objects' list"
    elif kind == "bad_id":
        features.write_text(good + feature_line("img2", arrays[2]))
        message = r"features\.tsv:2 \(image_id=img2\): image id 'img2' is not an integer"
    else:  # pragma: no cover
        raise AssertionError(kind)
    return features, predictions, lineidx, message


ERROR_KINDS = ["dim", "num_boxes", "num_boxes_whole", "base64", "fields", "nan", "lineidx", "missing_features",
               "missing_tags", "duplicate", "bad_json", "no_class", "no_objects", "bad_id"]


@pytest.mark.parametrize("kind", ERROR_KINDS)
def test_validation_errors_name_file_line_and_problem(tmp_path, kind):
    features, predictions, lineidx, message = _corrupt(kind, tmp_path)
    with pytest.raises(DataError, match=message):
        serialize_regions(features, predictions, [1, 2], tmp_path / "out", split="test", lineidx=lineidx)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_a_skipped_bad_row_of_a_split_image_still_leaves_it_missing(tmp_path):
    features, predictions, _, _ = _corrupt("dim", tmp_path)
    with pytest.raises(DataError, match=r"no features for 1 image\(s\) of the test split: 2 \(their rows were skipped"):
        serialize_regions(features, predictions, [1, 2], tmp_path / "out", split="test", on_bad_record="skip")


def test_decode_features_accepts_zero_boxes():
    row = regions.FeatureRow("f", 1, 0, "5", "0", "")
    array, problem = decode_features(row)
    assert problem is None and array.shape == (0, FEATURE_DIM)


# --------------------------------------------------------------------------------------------
# demo regions


@pytest.fixture(scope="module")
def region_archive(tmp_path_factory):
    spec = DemoSpec(name="demo_r", seed=5, sizes={"train": 30, "test": 12}, caption_language="en", regions=True)
    path = tmp_path_factory.mktemp("demo_r") / "demo_r.zip"
    write_demo_archive(spec, path)
    return spec, zipfile.ZipFile(path)


def _member_text(archive: zipfile.ZipFile, name: str) -> str:
    return archive.read(name).decode("utf-8")


def test_demo_region_members_and_lineidx(region_archive, tmp_path):
    spec, archive = region_archive
    assert archive.namelist() == demo.archive_members(spec)
    archive.extractall(tmp_path)
    root = tmp_path / "demo_r"
    for split in spec.sizes:
        rows = list(iter_feature_rows(root / f"{split}_features.tsv", root / f"{split}_features.lineidx"))
        assert len(rows) == spec.sizes[split]


def test_demo_appearance_seed_sets_the_detector_only(tmp_path):
    base = demo.DemoSpec(name="demo_a", seed=5, sizes={"test": 6}, caption_language="en", regions=True)
    shared = demo.DemoSpec(name="demo_a", seed=5, sizes={"test": 6}, caption_language="en", regions=True,
                           appearance_seed=0)
    samples = demo.generate_samples(base)
    assert [i.objects for i in demo.generate_samples(shared)["test"]] == [i.objects for i in samples["test"]]
    own, other = demo.region_data(base, samples), demo.region_data(shared, samples)
    seed0, seed5 = demo.appearance_prototypes(0), demo.appearance_prototypes(5)
    for image in samples["test"]:
        for obj, mine, theirs in zip(image.objects, own[image.image_id][0], other[image.image_id][0]):
            kind = (obj.shape, obj.colour)
            assert float((mine[:2048] - seed5[kind]).std()) < 0.2 < float((mine[:2048] - seed0[kind]).std())
            assert float((theirs[:2048] - seed0[kind]).std()) < 0.2
            np.testing.assert_array_equal(mine[2048:], theirs[2048:])
    with pytest.raises(demo.DemoSpecError, match="appearance_seed"):
        demo.DemoSpec(name="demo_a", sizes={"test": 2}, appearance_seed=-1)


def test_demo_region_boxes_tags_and_appearance(region_archive):
    spec, archive = region_archive
    samples = demo.generate_samples(spec)
    prototypes = demo.appearance_prototypes(spec.seed)
    by_kind: dict[tuple[str, str], list[np.ndarray]] = {}
    for split, images in samples.items():
        feature_lines = _member_text(archive, f"demo_r/{split}_features.tsv").splitlines()
        prediction_lines = _member_text(archive, f"demo_r/{split}_predictions.tsv").splitlines()
        assert len(feature_lines) == len(prediction_lines) == len(images)
        for image, fline, pline in zip(images, feature_lines, prediction_lines):
            image_id, num_boxes, payload = fline.split("\t")
            assert int(image_id) == image.image_id and int(num_boxes) == len(image.objects)
            array = np.frombuffer(base64.b64decode(payload), dtype="<f4").reshape(len(image.objects), FEATURE_DIM)
            pid, pjson = pline.split("\t")
            record = json.loads(pjson)
            assert int(pid) == image.image_id
            assert (record["image_w"], record["image_h"]) == (spec.image_size, spec.image_size)
            assert [o["class"] for o in record["objects"]] == [o.class_name for o in image.objects]
            assert [o["rect"] for o in record["objects"]] == [list(o.box) for o in image.objects]
            for obj, row in zip(image.objects, array):
                x1, y1, x2, y2 = obj.box
                s = spec.image_size
                np.testing.assert_allclose(row[2048:], [x1 / s, y1 / s, x2 / s, y2 / s, (x2 - x1) / s, (y2 - y1) / s],
                                           rtol=1e-6)
                noise = row[:2048] - prototypes[(obj.shape, obj.colour)]
                assert 0.05 < float(noise.std()) < 0.2
                by_kind.setdefault((obj.shape, obj.colour), []).append(row[:2048])
    kinds = [k for k, rows in by_kind.items() if len(rows) >= 2]
    assert kinds, "some (shape, colour) should repeat"

    def cos(a, b):
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    for kind in kinds:
        a, b = by_kind[kind][:2]
        assert not np.array_equal(a, b) and cos(a, b) > 0.97
    (k1, rows1), (k2, rows2) = list(by_kind.items())[:2]
    assert abs(cos(rows1[0], rows2[0])) < 0.2


def test_demo_english_captions_are_the_primary_texts(region_archive):
    spec, archive = region_archive
    samples = demo.generate_samples(spec)
    first = json.loads(_member_text(archive, "demo_r/test_texts.jsonl").splitlines()[0])
    zh = json.loads(_member_text(archive, "demo_r/test_texts.zh.jsonl").splitlines()[0])
    image = samples["test"][0]
    assert (first["text_id"], first["text"]) == image.captions_en[0]
    assert (zh["text_id"], zh["text"]) == image.captions_zh[0]


def test_demo_cn_archive_is_unchanged(tmp_path):
    entry = yaml.safe_load((REPO / "config" / "datasets.yaml").read_text(encoding="utf-8"))["demo_cn"]
    assert write_demo_archive(DemoSpec.from_config("demo_cn", entry["generator"]), tmp_path / "demo_cn.zip") \
        == DEMO_CN_SHA256


def test_explicit_defaults_give_the_same_archive(tmp_path):
    sizes = {"train": 3, "test": 2}
    plain = write_demo_archive(DemoSpec(name="d", sizes=sizes), tmp_path / "a.zip")
    explicit = write_demo_archive(DemoSpec(name="d", sizes=sizes, caption_language="zh", regions=False), tmp_path / "b.zip")
    assert plain == explicit


@pytest.mark.parametrize("kwargs, message", [
    ({"caption_language": "fr"}, "caption_language must be one of zh, en"),
    ({"regions": 1}, "regions must be true or false"),
])
def test_invalid_region_options(kwargs, message):
    with pytest.raises(demo.DemoSpecError, match=message):
        DemoSpec(sizes={"test": 2}, **kwargs)


def test_demo_regions_serialize_into_a_store(region_archive, tmp_path):
    spec, archive = region_archive
    archive.extractall(tmp_path / "dl")
    entry = {"format": "raw_tsv", "root": "demo_r",
             "regions": {"features": "{split}_features.tsv", "predictions": "{split}_predictions.tsv"}}
    serialize_split("raw_tsv", tmp_path / "dl", "test", tmp_path / "lmdb", entry=entry, progress=False, workers=1)
    regions.serialize_split_regions(tmp_path / "dl", entry, "test", tmp_path / "lmdb", tmp_path / "regions")
    samples = demo.generate_samples(spec)["test"]
    with RegionStore(tmp_path / "regions") as store, SplitStore(tmp_path / "lmdb") as split:
        assert store.image_ids() == split.image_ids() == [im.image_id for im in samples]
        assert store.tags(samples[0].image_id) == [o.class_name for o in samples[0].objects]
        assert store.features(samples[0].image_id).shape == (len(samples[0].objects), FEATURE_DIM)


# --------------------------------------------------------------------------------------------
# karpathy_json importer


def test_karpathy_json_importer(tmp_path):
    root = tmp_path / "dl"
    (root / "train2014").mkdir(parents=True)
    (root / "val2014").mkdir()
    images, sent = [], 100
    layout = [("train2014", "train", 9), ("val2014", "restval", 8), ("val2014", "val", 7), ("val2014", "test", 6),
              ("val2014", "test", 5)]
    for k, (folder, split, cocoid) in enumerate(layout):
        name = f"COCO_{folder}_{cocoid:012d}.jpg"
        (root / folder / name).write_bytes(make_image("JPEG", (32, 24), seed=k))
        sentences = [{"raw": f"caption {j} of image {cocoid} \n", "sentid": sent + j, "tokens": []} for j in range(2)]
        sent += 2
        images.append({"filepath": folder, "filename": name, "split": split, "cocoid": cocoid, "imgid": k,
                       "sentences": sentences, "sentids": [s["sentid"] for s in sentences]})
    (root / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    entry = {"format": "karpathy_json", "root": ".",
             "split_files": {s: "dataset_coco.json" for s in ("train", "valid", "test")}}
    expected = {"train": [9, 8], "valid": [7], "test": [6, 5]}
    for split, ids in expected.items():
        report = serialize_split("karpathy_json", root, split, tmp_path / split, entry=entry, progress=False, workers=1)
        assert report.images_kept == len(ids) and not report.skipped
        with SplitStore(tmp_path / split) as store:
            assert store.image_ids() == ids
            texts = store.texts()
            assert [t.image_ids for t in texts] == [(i,) for i in ids for _ in range(2)]
            assert texts[0].text == f"caption 0 of image {ids[0]}"
    # A missing image file is a bad record naming the file.
    (root / "val2014" / "COCO_val2014_000000000005.jpg").unlink()
    with pytest.raises(DataError, match=r"COCO_val2014_000000000005\.jpg.*image file not found"):
        serialize_split("karpathy_json", root, "test", tmp_path / "t2", entry=entry, progress=False, workers=1)


# --------------------------------------------------------------------------------------------
# workflow


def test_workflow_serializes_regions(workflow):
    name = "demo_tiny_en"
    entry = tiny_demo_entry({"test": 6}, name=name)
    entry["language"] = "en"
    entry["generator"].update(caption_language="en", regions=True)
    entry["regions"] = {"features": "{split}_features.tsv", "predictions": "{split}_predictions.tsv"}
    workflow.write_config({"grid": {"datasets": [name], "models": ["ernie_vil"]}}, datasets={name: entry})
    target = f"resources/{name}/regions/test"
    plan = workflow.run("-n", target)
    assert "serialize_regions" in plan.stdout
    workflow.run(target)
    with RegionStore(workflow.workdir / target) as store, SplitStore(workflow.workdir / f"resources/{name}/lmdb/test") as split:
        assert store.image_ids() == split.image_ids() and len(store) == 6
        first = store.get(store.image_ids()[0])
        assert first.features.shape[1] == FEATURE_DIM and first.tags and len(first.tags) == first.features.shape[0]
    assert (workflow.workdir / f"logs/serialize_regions/{name}/test.log").is_file()
    assert (workflow.workdir / f"benchmarks/serialize_regions/{name}/test.tsv").is_file()


def _child_features(args):
    store, image_id = args
    return store.features(image_id).tobytes()


def test_store_reads_in_forked_workers(tmp_path):
    import multiprocessing

    arrays = random_arrays([4, 5])
    features, predictions = write_sources(tmp_path, arrays, {4: ["a"], 5: ["b"]})
    serialize_regions(features, predictions, [4, 5], tmp_path / "out", split="test")
    with RegionStore(tmp_path / "out") as store:
        store.features(4)  # the parent's environment is open when the workers fork
        with multiprocessing.get_context("fork").Pool(2) as pool:
            got = pool.map(_child_features, [(store, 4), (store, 5)])
    assert got == [arrays[4].tobytes(), arrays[5].tobytes()]
