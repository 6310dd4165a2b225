"""The offline demo dataset: determinism, layout, captions and geometry of the real archive."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path

import pytest
import yaml
from PIL import Image

from vlretrieval.data import demo
from vlretrieval.data.demo import DemoSpec, DemoSpecError, generate_samples, write_demo_archive
from vlretrieval.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent

REPO = Path(__file__).resolve().parents[1]
SPLITS = ("train", "valid", "test")

# Written out independently of the module so a wrong table there cannot hide here.
COLOUR_ZH = {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色", "purple": "紫色", "orange": "橙色"}
SHAPE_ZH = {"circle": "圆形", "square": "正方形", "triangle": "三角形", "diamond": "菱形"}
POSITION_ZH = {
    "top-left": "左上角", "top": "上方", "top-right": "右上角",
    "left": "左侧", "centre": "中间", "right": "右侧",
    "bottom-left": "左下角", "bottom": "下方", "bottom-right": "右下角",
}  # fmt: skip
POSITION_EN = {
    "top-left": "top left", "top": "top", "top-right": "top right",
    "left": "left", "centre": "centre", "right": "right",
    "bottom-left": "bottom left", "bottom": "bottom", "bottom-right": "bottom right",
}  # fmt: skip
COUNT_ZH = {1: "一个", 2: "两个", 3: "三个"}
COUNT_EN = {1: "one", 2: "two", 3: "three"}
GRID = list(POSITION_ZH)


def read_jsonl(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.decode("utf-8").splitlines()]


class Archive:
    """The demo zip parsed into plain Python structures."""

    def __init__(self, path: Path, name: str):
        self.path = path
        with zipfile.ZipFile(path) as zf:
            self.infos = zf.infolist()

            def read(member: str) -> bytes:
                return zf.read(f"{name}/{member}")

            self.images: dict[str, dict[int, bytes]] = {}
            self.texts: dict[str, list[dict]] = {}
            self.texts_en: dict[str, list[dict]] = {}
            self.objects: dict[str, dict[int, list[dict]]] = {}
            for split in SPLITS:
                self.images[split] = {}
                for line in read(f"{split}_imgs.tsv").decode("ascii").splitlines():
                    image_id, payload = line.split("\t")
                    assert int(image_id) not in self.images[split]
                    self.images[split][int(image_id)] = base64.b64decode(payload, validate=True)
                self.texts[split] = read_jsonl(read(f"{split}_texts.jsonl"))
                self.texts_en[split] = read_jsonl(read(f"{split}_texts.en.jsonl"))
                self.objects[split] = {r["image_id"]: r["objects"] for r in read_jsonl(read(f"{split}_objects.jsonl"))}

    def all_objects(self) -> dict[int, list[dict]]:
        return {i: objs for split in SPLITS for i, objs in self.objects[split].items()}

    def all_texts(self, english: bool = False) -> list[dict]:
        source = self.texts_en if english else self.texts
        return [t for split in SPLITS for t in source[split]]


@pytest.fixture(scope="module")
def default_zip(tmp_path_factory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("demo") / "demo_cn.zip"
    digest = write_demo_archive(DemoSpec(), path)
    return path, digest


@pytest.fixture(scope="module")
def archive(default_zip) -> Archive:
    return Archive(default_zip[0], "demo_cn")


def cell_bounds(position: str, size: int) -> tuple[int, int, int, int]:
    row, col = divmod(GRID.index(position), 3)
    edges = [size * i // 3 for i in range(4)]
    return edges[col], edges[row], edges[col + 1], edges[row + 1]


# ------------------------------------------------------------------------------- determinism


def test_same_spec_gives_byte_identical_archive(tmp_path, default_zip):
    path, digest = default_zip
    again = tmp_path / "again" / "demo_cn.zip"
    assert write_demo_archive(DemoSpec(), again) == digest
    assert again.read_bytes() == path.read_bytes()
    assert (tmp_path / "again" / "demo_cn.zip.sha256").read_text() == path.with_name("demo_cn.zip.sha256").read_text()


def test_other_seed_gives_other_archive(tmp_path, default_zip):
    assert write_demo_archive(DemoSpec(seed=1), tmp_path / "demo_cn.zip") != default_zip[1]


def test_split_order_in_sizes_does_not_matter():
    a = DemoSpec(sizes={"train": 5, "valid": 2, "test": 3}, captions_per_image=2)
    b = DemoSpec(sizes={"test": 3, "train": 5, "valid": 2}, captions_per_image=2)
    assert a == b and list(b.sizes) == ["train", "valid", "test"]
    assert generate_samples(a) == generate_samples(b)


def test_image_size_does_not_change_contents_or_captions():
    small = generate_samples(DemoSpec(sizes={"train": 30}, image_size=48))["train"]
    large = generate_samples(DemoSpec(sizes={"train": 30}, image_size=96))["train"]
    assert [i.content for i in small] == [i.content for i in large]
    assert [i.captions_zh for i in small] == [i.captions_zh for i in large]


def test_sidecar_is_sha256sum_format(default_zip):
    path, digest = default_zip
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest == expected
    assert path.with_name("demo_cn.zip.sha256").read_text(encoding="utf-8") == f"{expected}  demo_cn.zip\n"


# ------------------------------------------------------------------------------- layout


def test_zip_layout(archive):
    names = [info.filename for info in archive.infos]
    expected = ["demo_cn/"]
    for split in SPLITS:
        expected += [f"demo_cn/{split}_{suffix}" for suffix in ("imgs.tsv", "texts.jsonl", "texts.en.jsonl", "objects.jsonl")]
    assert names == expected
    assert names == demo.archive_members(DemoSpec())
    assert {info.date_time for info in archive.infos} == {(1980, 1, 1, 0, 0, 0)}


def test_split_sizes_and_ids_unique_across_splits(archive):
    assert {split: len(archive.images[split]) for split in SPLITS} == {"train": 1000, "valid": 100, "test": 100}
    image_ids = [i for split in SPLITS for i in archive.images[split]]
    assert len(set(image_ids)) == len(image_ids) == 1200
    text_ids = [t["text_id"] for t in archive.all_texts()]
    assert len(set(text_ids)) == len(text_ids)
    for split in SPLITS:
        assert set(archive.objects[split]) == set(archive.images[split])
        # Every text points at exactly one image of its own split.
        for text in archive.texts[split]:
            assert len(text["image_ids"]) == 1 and text["image_ids"][0] in archive.images[split]


def test_every_image_is_an_rgb_png_of_the_right_size(archive):
    for split in SPLITS:
        for data in archive.images[split].values():
            assert data.startswith(b"\x89PNG\r\n\x1a\n")
            with Image.open(io.BytesIO(data)) as image:
                assert (image.format, image.mode, image.size) == ("PNG", "RGB", (64, 64))


# ------------------------------------------------------------------------------- captions


def test_caption_count_per_image(archive):
    per_image = Counter(t["image_ids"][0] for t in archive.all_texts())
    assert set(per_image) == set(archive.all_objects())
    assert min(per_image.values()) >= 5
    texts_per_image: dict[int, set[str]] = {}
    for t in archive.all_texts():
        texts_per_image.setdefault(t["image_ids"][0], set()).add(t["text"])
    assert all(len(texts) == per_image[i] for i, texts in texts_per_image.items()), "duplicate captions of one image"


def test_chinese_captions_describe_all_objects_and_nothing_else(archive):
    objects = archive.all_objects()
    for text in archive.all_texts():
        caption, objs = text["text"], objects[text["image_ids"][0]]
        nouns = {COLOUR_ZH[o["colour"]] + SHAPE_ZH[o["shape"]] for o in objs}
        places = {POSITION_ZH[o["position"]] for o in objs}
        for colour in COLOUR_ZH.values():
            for shape in SHAPE_ZH.values():
                assert ((colour + shape) in caption) == ((colour + shape) in nouns), caption
        for place in POSITION_ZH.values():
            assert (place in caption) == (place in places), caption
        n = len(objs)
        assert COUNT_ZH[n] in caption, caption
        assert not any(COUNT_ZH[m] in caption for m in COUNT_ZH if m > n), caption


def test_english_captions_are_aligned_with_chinese(archive):
    objects = archive.all_objects()
    for split in SPLITS:
        zh, en = archive.texts[split], archive.texts_en[split]
        assert [(t["text_id"], t["image_ids"]) for t in zh] == [(t["text_id"], t["image_ids"]) for t in en]
    for text in archive.all_texts(english=True):
        caption, objs = text["text"], objects[text["image_ids"][0]]
        assert re.search(rf"\b{COUNT_EN[len(objs)]}\b", caption), caption
        for o in objs:
            assert f"{o['colour']} {o['shape']}" in caption, caption
            assert re.search(rf"\b{POSITION_EN[o['position']]}\b", caption), caption


def test_captions_are_varied(archive):
    # The fixed wording of a caption is what remains once the object words are removed.
    objects = archive.all_objects()
    skeletons = set()
    for text in archive.all_texts():
        skeleton = text["text"]
        for o in objects[text["image_ids"][0]]:
            skeleton = skeleton.replace(COLOUR_ZH[o["colour"]] + SHAPE_ZH[o["shape"]], "N")
            skeleton = skeleton.replace(POSITION_ZH[o["position"]], "P")
        skeletons.add(re.sub(r"[一两三]个", "#", skeleton))
    assert len(skeletons) >= 10


def test_example_caption_wording():
    images = generate_samples(DemoSpec(sizes={"test": 40}, captions_per_image=10))["test"]
    two = next(i for i in images if len(i.objects) == 2)
    a, b = two.objects
    zh = [text for _, text in two.captions_zh]
    expected = {
        f"图中有两个物体：{POSITION_ZH[a.position]}的{COLOUR_ZH[a.colour]}{SHAPE_ZH[a.shape]}"
        f"和{POSITION_ZH[b.position]}的{COLOUR_ZH[b.colour]}{SHAPE_ZH[b.shape]}",
        f"图中有两个物体：{POSITION_ZH[b.position]}的{COLOUR_ZH[b.colour]}{SHAPE_ZH[b.shape]}"
        f"和{POSITION_ZH[a.position]}的{COLOUR_ZH[a.colour]}{SHAPE_ZH[a.shape]}",
    }
    assert len(expected & set(zh)) == 1


# ------------------------------------------------------------------------------- content and geometry


def test_image_contents_are_unique(archive):
    contents = [
        frozenset((o["shape"], o["colour"], o["position"]) for o in objs) for objs in archive.all_objects().values()
    ]
    assert len(set(contents)) == len(contents)
    counts = Counter(len(c) for c in contents)
    assert set(counts) == {1, 2, 3}


def test_objects_records(archive):
    for objs in archive.all_objects().values():
        assert 1 <= len(objs) <= 3
        positions = [o["position"] for o in objs]
        assert len(set(positions)) == len(positions), "two shapes in one cell"
        assert positions == sorted(positions, key=GRID.index)
        for o in objs:
            assert o["shape"] in SHAPE_ZH and o["colour"] in COLOUR_ZH and o["position"] in POSITION_ZH
            assert o["class_name"] == f"{o['colour']} {o['shape']}"


def test_boxes_lie_inside_their_cells(archive):
    for objs in archive.all_objects().values():
        for o in objs:
            x1, y1, x2, y2 = o["box"]
            assert all(isinstance(v, int) for v in o["box"])
            assert 0 <= x1 < x2 <= 64 and 0 <= y1 < y2 <= 64
            cx1, cy1, cx2, cy2 = cell_bounds(o["position"], 64)
            assert cx1 <= x1 and x2 <= cx2 and cy1 <= y1 and y2 <= cy2, (o, (cx1, cy1, cx2, cy2))
            assert x2 - x1 >= 8 and y2 - y1 >= 8


def test_box_centre_has_the_object_colour(archive):
    palette = demo.COLOUR_RGB
    for split in SPLITS:
        for image_id, data in archive.images[split].items():
            with Image.open(io.BytesIO(data)) as image:
                pixels = image.convert("RGB").load()
                corner = pixels[0, 0]
                for o in archive.objects[split][image_id]:
                    x1, y1, x2, y2 = o["box"]
                    pixel = pixels[(x1 + x2 - 1) // 2, (y1 + y2 - 1) // 2]
                    distance = {name: sum((a - b) ** 2 for a, b in zip(pixel, rgb)) for name, rgb in palette.items()}
                    assert min(distance, key=distance.get) == o["colour"] and distance[o["colour"]] < 30**2
                    assert sum((a - b) ** 2 for a, b in zip(pixel, corner)) > 60**2


def test_other_image_size_keeps_geometry():
    for image in generate_samples(DemoSpec(sizes={"train": 40}, image_size=100, captions_per_image=1))["train"]:
        with Image.open(io.BytesIO(image.png)) as png:
            assert png.size == (100, 100)
        for o in image.objects:
            cx1, cy1, cx2, cy2 = cell_bounds(o.position, 100)
            x1, y1, x2, y2 = o.box
            assert cx1 <= x1 < x2 <= cx2 and cy1 <= y1 < y2 <= cy2


def test_many_images_stay_unique_when_single_object_layouts_run_out():
    # 3,000 images at 15% single-object would ask for ~450 of the 216 single-object layouts.
    images = generate_samples(DemoSpec(sizes={"train": 3000}, image_size=30, captions_per_image=1))["train"]
    assert len({i.content for i in images}) == 3000
    assert sum(len(i.objects) == 1 for i in images) <= 216


# ------------------------------------------------------------------------------- configuration and errors


def test_from_config_matches_datasets_yaml():
    config = yaml.safe_load((REPO / "config" / "datasets.yaml").read_text(encoding="utf-8"))
    spec = DemoSpec.from_config("demo_cn", config["demo_cn"]["generator"])
    assert spec == DemoSpec()
    assert dict(spec.sizes) == {"train": 1000, "valid": 100, "test": 100}


def test_from_config_rejects_unknown_options():
    with pytest.raises(ConfigError, match="unknown generator option.*colours"):
        DemoSpec.from_config("demo_cn", {"seed": 1, "colours": 3})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sizes": {"train": -1, "test": 5}}, "must not be negative"),
        ({"sizes": {"train": 0}}, "zero images"),
        ({"sizes": {}}, "at least one split"),
        ({"sizes": {"train": 2.5}}, "must be an integer"),
        ({"sizes": {"tr/ain": 3}}, "invalid split name"),
        ({"sizes": {"train": 2_000_000}}, "distinct layouts"),
        ({"image_size": 12}, "too small"),
        ({"captions_per_image": 0}, "captions_per_image"),
        ({"captions_per_image": 11}, "captions_per_image"),
        ({"seed": -3}, "seed"),
        ({"name": "../evil"}, "invalid dataset name"),
        ({"name": ""}, "invalid dataset name"),
    ],
)
def test_invalid_specs_are_rejected(kwargs, message):
    with pytest.raises(DemoSpecError, match=message):
        DemoSpec(**kwargs)


def test_spec_errors_are_value_and_config_errors():
    assert issubclass(DemoSpecError, ValueError) and issubclass(DemoSpecError, ConfigError)


def test_smallest_image_size_draws(tmp_path):
    spec = DemoSpec(sizes={"train": 20}, image_size=demo.MIN_IMAGE_SIZE, captions_per_image=1)
    write_demo_archive(spec, tmp_path / "tiny.zip")
    with pytest.raises(DemoSpecError):
        DemoSpec(image_size=demo.MIN_IMAGE_SIZE - 1)


# ------------------------------------------------------------------------------- command line


def test_workflow_script_writes_the_same_archive_as_the_api(tmp_path):
    out = tmp_path / "out" / "mini.zip"
    generator = {"seed": 4, "sizes": {"train": 12, "valid": 3, "test": 3}, "image_size": 48, "captions_per_image": 2}
    proc = subprocess.run(
        [sys.executable, str(REPO / "workflow_scripts" / "make_demo.py"), "--name", "mini",
         "--generator", json.dumps(generator), "--out", str(out)],
        capture_output=True, text=True, check=True,
    )
    spec = DemoSpec.from_config("mini", generator)
    digest = write_demo_archive(spec, tmp_path / "api.zip")
    assert digest in proc.stdout
    assert out.read_bytes() == (tmp_path / "api.zip").read_bytes()
    with zipfile.ZipFile(out) as zf:
        assert zf.namelist()[0] == "mini/"
        assert len(zf.read("mini/valid_texts.jsonl").decode().splitlines()) == 6


def test_workflow_script_reports_a_bad_generator_block(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "workflow_scripts" / "make_demo.py"), "--name", "bad",
         "--generator", json.dumps({"sizes": {"train": -5}}), "--out", str(tmp_path / "x.zip")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 1
    assert "negative" in proc.stderr
    assert not (tmp_path / "x.zip").exists()


def test_demo_en_registry_entry_asks_for_english_and_regions():
    entry = yaml.safe_load((REPO / "config" / "datasets.yaml").read_text(encoding="utf-8"))["demo_en"]
    spec = DemoSpec.from_config("demo_en", entry["generator"])
    assert spec.caption_language == "en" and spec.regions
    members = demo.archive_members(spec)
    for split in spec.sizes:
        for suffix in ("texts.jsonl", "texts.zh.jsonl", "features.tsv", "features.lineidx", "predictions.tsv"):
            assert f"demo_en/{split}_{suffix}" in members
    assert not any(name.endswith("texts.en.jsonl") for name in members)
