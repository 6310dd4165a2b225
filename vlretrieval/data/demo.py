"""Deterministic offline demo dataset: coloured shapes at named grid positions with captions.

Every image holds one to three shapes (circle, square, triangle, diamond) in six colours, each in
its own cell of a 3x3 grid. Every caption names the colour, shape and position of *all* objects
in its image and their count, and no two images share the same set of objects, so each text has
exactly one correct image and retrieval is well posed.

The archive follows the Flickr30k-CN raw layout (see :mod:`vlretrieval.data.raw`) under a top
folder named after the dataset::

    {name}/
        {split}_imgs.tsv          image_id <TAB> base64 PNG
        {split}_texts.jsonl       {"text_id", "text", "image_ids"}  (Chinese)
        {split}_texts.en.jsonl    same text ids, English
        {split}_objects.jsonl     {"image_id", "objects": [{"shape", "colour", "position", "box", "class_name"}]}

for each split in canonical order (train, valid, test, then any other split name sorted). With
``caption_language="en"`` the English captions are the ones in ``{split}_texts.jsonl`` (what the
importers read) and the Chinese ones move to ``{split}_texts.zh.jsonl``. With ``regions=True``
each split also gets VinVL-format region data (see :mod:`vlretrieval.data.regions`)::

        {split}_features.tsv      image_id <TAB> num_boxes <TAB> base64 float32 [num_boxes, 2054]
        {split}_features.lineidx  byte offset of each line of the features tsv
        {split}_predictions.tsv   image_id <TAB> {"image_h", "image_w", "num_boxes", "objects": [{"class", "conf", "rect"}]}

One region per drawn object, in grid order: its appearance is a fixed 2048-d Gaussian vector per
(shape, colour) drawn from the appearance seed (the dataset seed unless given), plus a little
per-object Gaussian noise (``REGION_NOISE``), followed by the 6 VinVL box values of the object's box; its class (the
object tag) is ``"<colour> <shape>"``, the object's ``class_name``.
Image ids and text ids start at 1 and are unique across the whole archive.

The same :class:`DemoSpec` always gives a byte-identical archive: all randomness comes from
numpy generators seeded from ``spec.seed``, zip entries carry fixed timestamps and permissions
and are written in a fixed order, and PNGs are encoded with fixed settings.
"""

from __future__ import annotations

import base64
import contextlib
import io
import itertools
import json
import math
import numbers
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from vlretrieval.errors import ConfigError
from vlretrieval.io import atomic_open, atomic_path, sha256_file
from vlretrieval.data.raw import SPLITS, images_tsv_path, texts_jsonl_path, write_image_line, write_text_line
from vlretrieval.data.regions import APPEARANCE_DIM, box_features

# --------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
# Row-major grid order; also the order objects are listed in ``{split}_objects.jsonl``.
POSITIONS: tuple[str, ...] = (
    "top-left", "top", "top-right",
    "left", "centre", "right",
    "bottom-left", "bottom", "bottom-right",
)  # fmt: skip
MAX_OBJECTS = 3

COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 150, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 205, 20),
    "purple": (140, 50, 180),
    "orange": (245, 125, 15),
}
BACKGROUND_RGB: tuple[int, int, int] = (245, 244, 238)

SHAPE_ZH: dict[str, str] = {"circle": "圆形", "square": "正方形", "triangle": "三角形", "diamond": "菱形"}
COLOUR_ZH: dict[str, str] = {
    "red": "红色", "green": "绿色", "blue": "蓝色",
    "yellow": "黄色", "purple": "紫色", "orange": "橙色",
}  # fmt: skip
POSITION_ZH: dict[str, str] = {
    "top-left": "左上角", "top": "上方", "top-right": "右上角",
    "left": "左侧", "centre": "中间", "right": "右侧",
    "bottom-left": "左下角", "bottom": "下方", "bottom-right": "右下角",
}  # fmt: skip
COUNT_ZH: dict[int, str] = {1: "一个", 2: "两个", 3: "三个"}

# English place phrases carry their own preposition because it differs by position.
POSITION_EN: dict[str, str] = {
    "top-left": "at the top left", "top": "at the top", "top-right": "at the top right",
    "left": "on the left", "centre": "in the centre", "right": "on the right",
    "bottom-left": "at the bottom left", "bottom": "at the bottom", "bottom-right": "at the bottom right",
}  # fmt: skip
COUNT_EN: dict[int, str] = {1: "one", 2: "two", 3: "three"}

# A shape must keep this many pixels to every cell edge so neighbouring shapes never touch.
CELL_MARGIN = 1
# Below this side length circle, square, triangle and diamond stop looking different.
MIN_SHAPE_SIDE = 8
MIN_IMAGE_SIZE = 3 * (MIN_SHAPE_SIDE + 2 * CELL_MARGIN)
# Smallest shape side as a fraction of the usable cell, so jitter never makes a shape tiny.
_MIN_SIDE_FRACTION = 0.7

# Single objects have few distinct layouts (216), so they are kept rare to leave room for
# larger splits before the generator has to fall back to other counts.
_COUNT_WEIGHTS: dict[int, float] = {1: 0.15, 2: 0.45, 3: 0.40}

_PNG_COMPRESS_LEVEL = 6
_ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)  # earliest time a zip header can store
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_SPLIT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")

DEFAULT_SIZES: dict[str, int] = {"train": 1000, "valid": 100, "test": 100}
CAPTION_LANGUAGES = ("zh", "en")
# Per-object noise relative to the unit-variance (shape, colour) appearance: small enough that
# the kind stays obvious, large enough that no two regions are identical.
REGION_NOISE = 0.1


class DemoSpecError(ConfigError, ValueError):
    """The demo generator was asked for something it cannot produce."""


def _combinations_per_count() -> dict[int, int]:
    kinds = len(SHAPES) * len(COLOURS)
    return {k: math.comb(len(POSITIONS), k) * kinds**k for k in range(1, MAX_OBJECTS + 1)}


def max_unique_images() -> int:
    """How many images with pairwise different content the vocabulary allows."""
    return sum(_combinations_per_count().values())


# --------------------------------------------------------------------------------------------
# Samples
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoObject:
    """One shape; ``box`` is ``[x1, y1, x2, y2]`` in pixels with exclusive ``x2``/``y2``."""

    shape: str
    colour: str
    position: str
    box: tuple[int, int, int, int]

    @property
    def class_name(self) -> str:
        return f"{self.colour} {self.shape}"

    def to_json(self) -> dict[str, object]:
        return {
            "shape": self.shape,
            "colour": self.colour,
            "position": self.position,
            "box": list(self.box),
            "class_name": self.class_name,
        }


@dataclass(frozen=True)
class DemoImage:
    """One generated image: objects in grid order, PNG bytes and aligned zh/en captions."""

    image_id: int
    objects: tuple[DemoObject, ...]
    png: bytes
    captions_zh: list[tuple[int, str]]
    captions_en: list[tuple[int, str]]

    @property
    def content(self) -> tuple[tuple[str, str, str], ...]:
        """The (shape, colour, position) triples that make this image unique in its dataset."""
        return tuple((o.shape, o.colour, o.position) for o in self.objects)


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------


def _zh_and(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else "、".join(items[:-1]) + "和" + items[-1]


def _en_and(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _zh_noun(o: DemoObject) -> str:
    return COLOUR_ZH[o.colour] + SHAPE_ZH[o.shape]


def _en_noun(o: DemoObject) -> str:
    return f"{o.colour} {o.shape}"


def _en_a(o: DemoObject) -> str:
    noun = _en_noun(o)
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _zh_pos_of(o: DemoObject) -> str:  # 左上角的红色圆形
    return f"{POSITION_ZH[o.position]}的{_zh_noun(o)}"


def _zh_one_at(o: DemoObject) -> str:  # 一个红色圆形在左上角
    return f"一个{_zh_noun(o)}在{POSITION_ZH[o.position]}"


def _zh_at_has(o: DemoObject) -> str:  # 左上角有一个红色圆形
    return f"{POSITION_ZH[o.position]}有一个{_zh_noun(o)}"


def _zh_is_at(o: DemoObject) -> str:  # 红色圆形在左上角
    return f"{_zh_noun(o)}在{POSITION_ZH[o.position]}"


def _zh_lies_at(o: DemoObject) -> str:  # 红色圆形位于左上角
    return f"{_zh_noun(o)}位于{POSITION_ZH[o.position]}"


def _en_a_at(o: DemoObject) -> str:  # a red circle at the top left
    return f"{_en_a(o)} {POSITION_EN[o.position]}"


def _en_the_at(o: DemoObject) -> str:  # the red circle at the top left
    return f"the {_en_noun(o)} {POSITION_EN[o.position]}"


def _en_the_is_at(o: DemoObject) -> str:  # the red circle is at the top left
    return f"the {_en_noun(o)} is {POSITION_EN[o.position]}"


def _shapes_en(n: int, noun: str = "shape") -> str:
    return f"{COUNT_EN[n]} {noun}" + ("s" if n > 1 else "")


_Template = Callable[[Sequence[DemoObject]], tuple[str, str]]


def _t_objects_list(objs: Sequence[DemoObject]) -> tuple[str, str]:
    n = len(objs)
    zh = f"图中有{COUNT_ZH[n]}物体：{_zh_and([_zh_pos_of(o) for o in objs])}"
    en = f"{_shapes_en(n)}: {_en_and([_en_a_at(o) for o in objs])}"
    return zh, en


def _t_clauses_total(objs: Sequence[DemoObject]) -> tuple[str, str]:
    n = len(objs)
    zh = "，".join(_zh_one_at(o) for o in objs) + f"，共{COUNT_ZH[n]}图形"
    en = ", ".join(_en_a_at(o) for o in objs) + f", {_shapes_en(n)} in total"
    return zh, en


def _t_list_altogether(objs: Sequence[DemoObject]) -> tuple[str, str]:
    n = len(objs)
    zh = _zh_and([_zh_pos_of(o) for o in objs]) + f"，一共{COUNT_ZH[n]}图形"
    en = _en_and([_en_the_at(o) for o in objs]) + f", {_shapes_en(n)} altogether"
    return zh, en


def _t_there_is(objs: Sequence[DemoObject]) -> tuple[str, str]:
    n = len(objs)
    zh = "，".join(_zh_at_has(o) for o in objs) + f"，总共{COUNT_ZH[n]}图形"
    en = f"there is {_en_and([_en_a_at(o) for o in objs])}, {_shapes_en(n)} in all"
    return zh, en


def _t_background(objs: Sequence[DemoObject]) -> tuple[str, str]:
    n = len(objs)
    zh = f"浅色背景上有{COUNT_ZH[n]}图形：{_zh_and([_zh_pos_of(o) for o in objs])}"
    en = f"{_shapes_en(n)} on a light background: {_en_and([_en_a_at(o) for o in objs])}"
    return zh, en


def _t_picture_of(objs: Sequence[DemoObject]) -> tuple[str, str]:
    n = len(objs)
    zh = f"一张有{COUNT_ZH[n]}几何图形的图片，" + "，".join(_zh_lies_at(o) for o in objs)
    en = f"a picture of {_shapes_en(n, 'geometric shape')}: " + _en_and([_en_the_is_at(o) for o in objs])
    return zh, en


def _t_coloured(objs: Sequence[DemoObject]) -> tuple[str, str]:
    n = len(objs)
    zh = f"{COUNT_ZH[n]}彩色图形，" + "，".join(_zh_is_at(o) for o in objs)
    en = f"{_shapes_en(n, 'coloured shape')}; " + ", ".join(_en_the_is_at(o) for o in objs)
    return zh, en


def _t_namely(objs: Sequence[DemoObject]) -> tuple[str, str]:
    n = len(objs)
    zh_lead, en_lead = ("分别是", "namely ") if n > 1 else ("是", "")
    zh = f"画面中共有{COUNT_ZH[n]}图形，{zh_lead}{_zh_and([_zh_pos_of(o) for o in objs])}"
    en = f"the image shows {_shapes_en(n)}, {en_lead}{_en_and([_en_a_at(o) for o in objs])}"
    return zh, en


def _t_in_this_picture(objs: Sequence[DemoObject]) -> tuple[str, str]:
    n = len(objs)
    zh = "在这幅图中，" + "，".join(_zh_at_has(o) for o in objs) + f"，一共有{COUNT_ZH[n]}物体"
    en = f"in this picture there is {_en_and([_en_a_at(o) for o in objs])}, {COUNT_EN[n]} in total"
    return zh, en


def _t_count_first(objs: Sequence[DemoObject]) -> tuple[str, str]:
    n = len(objs)
    zh = f"共{COUNT_ZH[n]}图形：" + "，".join(_zh_lies_at(o) for o in objs)
    en = f"{_shapes_en(n)} in total: " + _en_and([_en_a_at(o) for o in objs])
    return zh, en


_TEMPLATES: tuple[_Template, ...] = (
    _t_objects_list,
    _t_clauses_total,
    _t_list_altogether,
    _t_there_is,
    _t_background,
    _t_picture_of,
    _t_coloured,
    _t_namely,
    _t_in_this_picture,
    _t_count_first,
)
MAX_CAPTIONS_PER_IMAGE = len(_TEMPLATES)


def _captions(objects: Sequence[DemoObject], n: int, rng: np.random.Generator) -> list[tuple[str, str]]:
    """``n`` (zh, en) caption pairs from distinct templates, each listing objects in its own order."""
    pairs = []
    for template in rng.choice(len(_TEMPLATES), size=n, replace=False).tolist():
        order = rng.permutation(len(objects)).tolist()
        pairs.append(_TEMPLATES[template]([objects[i] for i in order]))
    return pairs


# --------------------------------------------------------------------------------------------
# Spec
# --------------------------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _split_order(name: str) -> tuple[int, str]:
    return (SPLITS.index(name), "") if name in SPLITS else (len(SPLITS), name)


def _normalise_sizes(sizes: Mapping[str, int] | Iterable[tuple[str, int]]) -> dict[str, int]:
    pairs = list(sizes.items()) if isinstance(sizes, Mapping) else list(sizes)
    result: dict[str, int] = {}
    for pair in pairs:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise DemoSpecError(f"sizes must map split names to image counts, got item {pair!r}")
        split, count = pair
        if not isinstance(split, str) or not _SPLIT_RE.fullmatch(split):
            raise DemoSpecError(f"invalid split name {split!r}: use letters, digits, '_' or '-'")
        if split in result:
            raise DemoSpecError(f"split {split!r} is given more than once")
        if not _is_int(count):
            raise DemoSpecError(f"size of split {split!r} must be an integer, got {count!r}")
        if count < 0:
            raise DemoSpecError(f"size of split {split!r} must not be negative, got {count}")
        result[split] = int(count)
    if not result:
        raise DemoSpecError("sizes must name at least one split")
    # Canonical order so that {"valid": .., "train": ..} and {"train": .., "valid": ..} give
    # the same ids and the same archive.
    return {split: result[split] for split in sorted(result, key=_split_order)}


@dataclass(frozen=True)
class DemoSpec:
    """Everything that determines a demo archive; equal specs give byte-identical archives.

    ``sizes`` accepts any mapping (or iterable of pairs) from split name to image count; it is
    stored as a plain dict in canonical split order and must be treated as read-only.
    """

    name: str = "demo_cn"
    seed: int = 0
    # Left out of the hash because a dict cannot be hashed; equality still compares it.
    sizes: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_SIZES), hash=False)
    image_size: int = 64
    captions_per_image: int = 5
    # Which language goes into {split}_texts.jsonl, the captions the importers read.
    caption_language: str = "zh"
    # Also write VinVL-format region features and object predictions per split.
    regions: bool = False
    # Seed of the region appearance vectors, the demo's "detector"; None: ``seed``. A split generated
    # with another seed but the appearance seed of the dataset a model was trained on has regions that
    # model can read, as one detector's features carry over between datasets.
    appearance_seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.fullmatch(self.name):
            raise DemoSpecError(
                f"invalid dataset name {self.name!r}: start with a letter or digit, then use letters, "
                "digits, '_', '.' or '-'"
            )
        if not _is_int(self.seed) or self.seed < 0:
            raise DemoSpecError(f"seed must be a non-negative integer, got {self.seed!r}")
        object.__setattr__(self, "seed", int(self.seed))
        object.__setattr__(self, "sizes", _normalise_sizes(self.sizes))
        if not _is_int(self.image_size):
            raise DemoSpecError(f"image_size must be an integer, got {self.image_size!r}")
        if self.image_size < MIN_IMAGE_SIZE:
            raise DemoSpecError(
                f"image_size {self.image_size} is too small to draw shapes in a 3x3 grid "
                f"(minimum {MIN_IMAGE_SIZE} px)"
            )
        object.__setattr__(self, "image_size", int(self.image_size))
        if not _is_int(self.captions_per_image) or not 1 <= self.captions_per_image <= MAX_CAPTIONS_PER_IMAGE:
            raise DemoSpecError(
                f"captions_per_image must be an integer from 1 to {MAX_CAPTIONS_PER_IMAGE} "
                f"(the number of distinct caption templates), got {self.captions_per_image!r}"
            )
        object.__setattr__(self, "captions_per_image", int(self.captions_per_image))
        if self.caption_language not in CAPTION_LANGUAGES:
            raise DemoSpecError(
                f"caption_language must be one of {', '.join(CAPTION_LANGUAGES)}, got {self.caption_language!r}"
            )
        if not isinstance(self.regions, bool):
            raise DemoSpecError(f"regions must be true or false, got {self.regions!r}")
        if self.appearance_seed is not None and (not _is_int(self.appearance_seed) or self.appearance_seed < 0):
            raise DemoSpecError(f"appearance_seed must be a non-negative integer or null, got {self.appearance_seed!r}")
        total = self.total_images
        if total == 0:
            raise DemoSpecError("sizes add up to zero images")
        if total > max_unique_images():
            raise DemoSpecError(
                f"asked for {total} images but only {max_unique_images()} distinct layouts exist "
                f"({len(SHAPES)} shapes x {len(COLOURS)} colours, up to {MAX_OBJECTS} of {len(POSITIONS)} cells)"
            )

    @property
    def total_images(self) -> int:
        return sum(self.sizes.values())

    @classmethod
    def from_config(cls, name: str, generator_cfg: Mapping[str, object] | None) -> "DemoSpec":
        """Build a spec from the ``generator`` block of a ``datasets.yaml`` entry."""
        if generator_cfg is not None and not isinstance(generator_cfg, Mapping):
            raise DemoSpecError(f"dataset {name!r}: the generator block must be a mapping, got {generator_cfg!r}")
        cfg = dict(generator_cfg or {})
        known = {"seed", "sizes", "image_size", "captions_per_image", "caption_language", "regions"}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise DemoSpecError(
                f"dataset {name!r}: unknown generator option(s) {', '.join(map(str, unknown))}; "
                f"expected some of {', '.join(sorted(known))}"
            )
        if "sizes" in cfg and not isinstance(cfg["sizes"], Mapping):
            raise DemoSpecError(f"dataset {name!r}: generator.sizes must be a mapping split -> count")
        return cls(name=name, **cfg)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Layout and rendering
# --------------------------------------------------------------------------------------------


def grid_cell(position: str, image_size: int) -> tuple[int, int, int, int]:
    """Pixel bounds ``(x1, y1, x2, y2)`` (exclusive end) of a named cell of the 3x3 grid."""
    row, col = divmod(POSITIONS.index(position), 3)
    edges = [i * image_size // 3 for i in range(4)]
    return edges[col], edges[row], edges[col + 1], edges[row + 1]


def _draw_count_plan(total: int, rng: np.random.Generator) -> np.ndarray:
    """Number of objects for each image, never more images of one count than layouts exist."""
    counts = np.array(sorted(_COUNT_WEIGHTS), dtype=np.int64)
    weights = np.array([_COUNT_WEIGHTS[int(k)] for k in counts])
    plan = rng.choice(counts, size=total, p=weights / weights.sum())
    capacity = _combinations_per_count()

    def move_excess(src: int, dst: int) -> None:
        members = np.flatnonzero(plan == src)
        excess = len(members) - capacity[src]
        if excess > 0:
            plan[rng.choice(members, size=excess, replace=False)] = dst

    # Push overflow upwards first, then back down; since the total fits overall, every count
    # ends within its capacity.
    ks = [int(k) for k in counts]
    for src, dst in zip(ks, ks[1:]):
        move_excess(src, dst)
    for src, dst in zip(ks[::-1], ks[-2::-1]):
        move_excess(src, dst)
    return plan


_CELL_COMBINATIONS: dict[int, list[tuple[int, ...]]] = {
    k: list(itertools.combinations(range(len(POSITIONS)), k)) for k in range(1, MAX_OBJECTS + 1)
}


def _decode_content(count: int, index: int) -> list[tuple[str, str, str]]:
    """Map ``index`` in ``[0, capacity(count))`` to a distinct layout of ``count`` objects.

    The objects come out in grid order because the cell combinations are ascending.
    """
    kinds = len(SHAPES) * len(COLOURS)
    cells_index, rest = divmod(index, kinds**count)
    cells = _CELL_COMBINATIONS[count][cells_index]
    content = []
    for cell in cells:
        rest, kind = divmod(rest, kinds)
        shape, colour = divmod(kind, len(COLOURS))
        content.append((SHAPES[shape], COLOURS[colour], POSITIONS[cell]))
    return content


def _draw_contents(total: int, rng: np.random.Generator) -> list[list[tuple[str, str, str]]]:
    """``total`` pairwise different layouts, in random order of object counts."""
    plan = _draw_count_plan(total, rng)
    capacity = _combinations_per_count()
    contents: list[list[tuple[str, str, str]] | None] = [None] * total
    # Sampling layout indices without replacement makes uniqueness hold by construction, so
    # no rejection loop can stall when a count's layouts are nearly used up.
    for count in sorted(capacity):
        slots = np.flatnonzero(plan == count)
        if len(slots) == 0:
            continue
        indices = rng.choice(capacity[count], size=len(slots), replace=False)
        for slot, index in zip(slots.tolist(), indices.tolist()):
            contents[slot] = _decode_content(count, index)
    return contents  # type: ignore[return-value]


def _place(position: str, image_size: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = grid_cell(position, image_size)
    room_x = x2 - x1 - 2 * CELL_MARGIN
    room_y = y2 - y1 - 2 * CELL_MARGIN
    inner = min(room_x, room_y)
    side = int(rng.integers(max(MIN_SHAPE_SIDE, math.ceil(_MIN_SIDE_FRACTION * inner)), inner + 1))
    left = x1 + CELL_MARGIN + int(rng.integers(0, room_x - side + 1))
    top = y1 + CELL_MARGIN + int(rng.integers(0, room_y - side + 1))
    return left, top, left + side, top + side


def _draw_shape(draw: ImageDraw.ImageDraw, obj: DemoObject) -> None:
    # Pillow treats the end coordinate as inclusive, the box's is exclusive.
    x1, y1, x2, y2 = obj.box
    x2, y2 = x2 - 1, y2 - 1
    mx, my = (x1 + x2) / 2, (y1 + y2) / 2
    fill = COLOUR_RGB[obj.colour]
    if obj.shape == "circle":
        draw.ellipse((x1, y1, x2, y2), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((x1, y1, x2, y2), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(x1, y2), (x2, y2), (mx, y1)], fill=fill)
    elif obj.shape == "diamond":
        draw.polygon([(mx, y1), (x2, my), (mx, y2), (x1, my)], fill=fill)
    else:  # pragma: no cover - SHAPES and this function are edited together
        raise AssertionError(f"no drawing for shape {obj.shape!r}")


def render_png(objects: Sequence[DemoObject], image_size: int) -> bytes:
    """Encode the objects on the light background as an RGB PNG without metadata."""
    image = Image.new("RGB", (image_size, image_size), BACKGROUND_RGB)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        _draw_shape(draw, obj)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=_PNG_COMPRESS_LEVEL, optimize=False)
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------
# Generation and archive
# --------------------------------------------------------------------------------------------


def generate_samples(spec: DemoSpec) -> dict[str, list[DemoImage]]:
    """Generate every split in memory, keyed by split name in canonical order."""
    # Independent streams keep the layouts fixed when only captions_per_image or image_size
    # changes, and the captions fixed when only image_size changes.
    content_ss, placement_ss, caption_ss = np.random.SeedSequence(spec.seed).spawn(3)
    contents = _draw_contents(spec.total_images, np.random.default_rng(content_ss))
    placement_rng = np.random.default_rng(placement_ss)
    caption_rng = np.random.default_rng(caption_ss)

    samples: dict[str, list[DemoImage]] = {}
    image_id = 0
    text_id = 0
    for split, size in spec.sizes.items():
        images = []
        for _ in range(size):
            image_id += 1
            objects = tuple(
                DemoObject(shape, colour, position, _place(position, spec.image_size, placement_rng))
                for shape, colour, position in contents[image_id - 1]
            )
            captions_zh, captions_en = [], []
            for zh, en in _captions(objects, spec.captions_per_image, caption_rng):
                text_id += 1
                captions_zh.append((text_id, zh))
                captions_en.append((text_id, en))
            images.append(
                DemoImage(image_id, objects, render_png(objects, spec.image_size), captions_zh, captions_en)
            )
        samples[split] = images
    return samples


def texts_en_jsonl_path(root: str | Path, split: str) -> Path:
    return Path(root) / f"{split}_texts.en.jsonl"


def texts_zh_jsonl_path(root: str | Path, split: str) -> Path:
    return Path(root) / f"{split}_texts.zh.jsonl"


def objects_jsonl_path(root: str | Path, split: str) -> Path:
    return Path(root) / f"{split}_objects.jsonl"


def features_tsv_path(root: str | Path, split: str) -> Path:
    return Path(root) / f"{split}_features.tsv"


def features_lineidx_path(root: str | Path, split: str) -> Path:
    return Path(root) / f"{split}_features.lineidx"


def predictions_tsv_path(root: str | Path, split: str) -> Path:
    return Path(root) / f"{split}_predictions.tsv"


def _second_texts_path(spec: DemoSpec) -> Callable[[str | Path, str], Path]:
    return texts_en_jsonl_path if spec.caption_language == "zh" else texts_zh_jsonl_path


def archive_members(spec: DemoSpec) -> list[str]:
    """Zip entry names in the order :func:`write_demo_archive` writes them."""
    names = [f"{spec.name}/"]
    paths = [images_tsv_path, texts_jsonl_path, _second_texts_path(spec), objects_jsonl_path]
    if spec.regions:
        paths += [features_tsv_path, features_lineidx_path, predictions_tsv_path]
    for split in spec.sizes:
        for path_of in paths:
            names.append(path_of(spec.name, split).as_posix())
    return names


def appearance_prototypes(seed: int) -> dict[tuple[str, str], np.ndarray]:
    """The fixed float32 appearance vector of every (shape, colour), drawn from ``seed``."""
    # The fourth child of the seed's sequence: generate_samples uses the first three, so turning
    # regions on changes nothing else in the archive.
    rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(4)[3])
    return {
        (shape, colour): rng.standard_normal(APPEARANCE_DIM, dtype=np.float32)
        for shape in SHAPES
        for colour in COLOURS
    }


def region_data(spec: DemoSpec, samples: Mapping[str, Sequence[DemoImage]]) -> dict[int, tuple[np.ndarray, dict]]:
    """Per image id: the float32 ``[num_objects, 2054]`` region features and the predictions record."""
    prototypes = appearance_prototypes(spec.seed if spec.appearance_seed is None else int(spec.appearance_seed))
    noise_rng = np.random.default_rng(np.random.SeedSequence(spec.seed).spawn(5)[4])
    result = {}
    for images in samples.values():
        for image in images:
            objects = image.objects
            appearance = np.stack([prototypes[(o.shape, o.colour)] for o in objects])
            appearance += REGION_NOISE * noise_rng.standard_normal(appearance.shape, dtype=np.float32)
            boxes = box_features([o.box for o in objects], spec.image_size, spec.image_size)
            features = np.concatenate([appearance, boxes], axis=1).astype(np.float32)
            predictions = {
                "image_h": spec.image_size,
                "image_w": spec.image_size,
                "num_boxes": len(objects),
                "objects": [{"class": o.class_name, "conf": 1.0, "rect": list(o.box)} for o in objects],
            }
            result[image.image_id] = (features, predictions)
    return result


def _zip_info(name: str) -> zipfile.ZipInfo:
    # Fixed time, permissions and host system: these otherwise leak the build machine into the bytes.
    info = zipfile.ZipInfo(name, date_time=_ZIP_DATE_TIME)
    info.create_system = 3
    if name.endswith("/"):
        info.external_attr = (0o40755 << 16) | 0x10
        info.compress_type = zipfile.ZIP_STORED
    else:
        info.external_attr = 0o100644 << 16
        info.compress_type = zipfile.ZIP_DEFLATED
    return info


@contextlib.contextmanager
def _open_member(archive: zipfile.ZipFile, path: Path) -> Iterator[io.TextIOWrapper]:
    with archive.open(_zip_info(path.as_posix()), "w") as raw:
        # newline="\n" keeps line ends identical on every platform.
        with io.TextIOWrapper(raw, encoding="utf-8", newline="\n") as handle:
            yield handle


def _write_split(
    archive: zipfile.ZipFile,
    spec: DemoSpec,
    split: str,
    images: Sequence[DemoImage],
    regions: Mapping[int, tuple[np.ndarray, dict]] | None,
) -> None:
    root = spec.name
    with _open_member(archive, images_tsv_path(root, split)) as handle:
        for image in images:
            write_image_line(handle, image.image_id, image.png)
    first, second = ("captions_zh", "captions_en") if spec.caption_language == "zh" else ("captions_en", "captions_zh")
    for path, captions in ((texts_jsonl_path(root, split), first), (_second_texts_path(spec)(root, split), second)):
        with _open_member(archive, path) as handle:
            for image in images:
                for text_id, text in getattr(image, captions):
                    write_text_line(handle, text_id, text, [image.image_id])
    with _open_member(archive, objects_jsonl_path(root, split)) as handle:
        for image in images:
            record = {"image_id": image.image_id, "objects": [o.to_json() for o in image.objects]}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    if regions is None:
        return
    offsets = []
    with _open_member(archive, features_tsv_path(root, split)) as handle:
        offset = 0
        for image in images:
            features = regions[image.image_id][0]
            payload = base64.b64encode(features.astype("<f4").tobytes()).decode("ascii")
            line = f"{image.image_id}\t{features.shape[0]}\t{payload}\n"
            offsets.append(offset)
            offset += len(line)  # ASCII, so characters are bytes
            handle.write(line)
    with _open_member(archive, features_lineidx_path(root, split)) as handle:
        handle.writelines(f"{o}\n" for o in offsets)
    with _open_member(archive, predictions_tsv_path(root, split)) as handle:
        for image in images:
            record = json.dumps(regions[image.image_id][1], sort_keys=True, separators=(",", ":"))
            handle.write(f"{image.image_id}\t{record}\n")


def write_demo_archive(spec: DemoSpec, out_zip: str | Path) -> str:
    """Write the demo zip atomically plus ``<out_zip>.sha256``; return the archive's hex sha256.

    Entries appear in the order given by :func:`archive_members`.
    """
    out_zip = Path(out_zip)
    samples = generate_samples(spec)
    regions = region_data(spec, samples) if spec.regions else None
    with atomic_path(out_zip) as tmp:
        with zipfile.ZipFile(tmp, "w") as archive:
            archive.writestr(_zip_info(f"{spec.name}/"), b"")
            for split, images in samples.items():
                _write_split(archive, spec, split, images, regions)
        digest = sha256_file(tmp)
    # Written only once the zip is in place, so a sidecar never names an archive that does not exist.
    with atomic_open(out_zip.with_name(out_zip.name + ".sha256")) as handle:
        handle.write(f"{digest}  {out_zip.name}\n")
    return digest
