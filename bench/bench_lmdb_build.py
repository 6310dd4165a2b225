"""Benchmark: building a serialized split against its validation floor and a plain copy.

Generates a synthetic raw split (``{split}_imgs.tsv`` + ``{split}_texts.jsonl``) of distinct
images, photo-like by default (``--size 500x375``: a smooth random field with some grain, JPEG
quality 90, ~50 KB, the shape and weight of a Flickr30k image) or noise of ``--image-kb``, then
times

* ``serialize_split`` (strict base64, Pillow verify + decode, duplicate and reference checks,
  two LMDB environments, the gold jsonl and the report),
* the validation floor: Pillow fully decoding the same image bytes (``Image.open`` +
  ``load()``) on the same number of threads the build checks images on, base64 already decoded,
* a sequential copy of the tsv and jsonl into another file with a final fsync: the I/O floor.

``build_over_floor`` is the figure (goal <= 1.5). At Flickr30k-CN scale::

    python bench/bench_lmdb_build.py --images 31783 --json FILE

Usage::

    python bench/bench_lmdb_build.py [--images 5000] [--captions-per-image 5] [--size 500x375 | --image-kb 20]
"""

from __future__ import annotations

import argparse
import binascii
import io
import os
import random
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

from PIL import Image, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchjson import write_figures  # noqa: E402

from vlretrieval.data import raw  # noqa: E402
from vlretrieval.data.lmdb_store import SplitStore, serialize_split  # noqa: E402
from vlretrieval.data.validation import check_image_bytes  # noqa: E402

SPLIT = "train"


def _encode(image: Image.Image, fmt: str, quality: int = 75) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"quality": quality} if fmt == "JPEG" else {"compress_level": 1}))
    return buffer.getvalue()


_GRAIN_LAYERS = 32


def _grain_layers(rng: random.Random, width: int, height: int) -> list[Image.Image]:
    return [Image.frombytes("RGB", (width, height), rng.randbytes(width * height * 3)).filter(ImageFilter.BLUR)
            for _ in range(_GRAIN_LAYERS)]


def _photo_like(rng: random.Random, fmt: str, grain: list[Image.Image]) -> bytes:
    # A coarse random field blown up (smooth regions and edges, as in photos) plus fine grain, so
    # the JPEG weighs what a photo of this size does; the coarse field makes every image distinct.
    width, height = grain[0].size
    coarse = Image.frombytes("RGB", (width // 16, height // 16), rng.randbytes((width // 16) * (height // 16) * 3))
    image = coarse.resize((width, height), Image.BICUBIC)
    return _encode(Image.blend(image, rng.choice(grain), 0.15), fmt, quality=90)


def _side_for(rng: random.Random, fmt: str, target_bytes: int) -> int:
    # Noise barely compresses, so encoded size grows with the pixel count; measure the rate once.
    probe = 128
    size = len(_encode(Image.frombytes("RGB", (probe, probe), rng.randbytes(probe * probe * 3)), fmt))
    return max(8, int(probe * (target_bytes / size) ** 0.5))


def _noise_image(rng: random.Random, fmt: str, side: int) -> bytes:
    return _encode(Image.frombytes("RGB", (side, side), rng.randbytes(side * side * 3)), fmt)


def generate(root: Path, n_images: int, captions_per_image: int, image_kb: float | None, fmt: str, seed: int,
             size: tuple[int, int] = (500, 375)) -> dict:
    """Write the raw split; images are photo-like at ``size``, or noise of ``image_kb`` when given."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    image_bytes = 0
    sides = {kind: _side_for(rng, kind, int(image_kb * 1024)) for kind in ("JPEG", "PNG")} if image_kb else {}
    grain = None if image_kb else _grain_layers(rng, *size)
    kinds = [fmt if fmt != "mixed" else ("JPEG" if image_id % 2 else "PNG") for image_id in range(n_images)]
    seeds = [rng.getrandbits(64) for _ in range(n_images)]

    def make(image_id: int) -> bytes:
        image_rng = random.Random(seeds[image_id])
        kind = kinds[image_id]
        return _noise_image(image_rng, kind, sides[kind]) if image_kb else _photo_like(image_rng, kind, grain)

    # Pillow encodes without the GIL, so threads speed up generating a Flickr30k-sized split.
    with open(raw.images_tsv_path(root, SPLIT), "w", encoding="utf-8") as handle, \
            ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for image_id, data in enumerate(pool.map(make, range(n_images), chunksize=32)):
            image_bytes += len(data)
            raw.write_image_line(handle, image_id, data)
    n_texts = 0
    with open(raw.texts_jsonl_path(root, SPLIT), "w", encoding="utf-8") as handle:
        for image_id in range(n_images):
            for k in range(captions_per_image):
                caption = f"第{image_id}张图片的第{k}条描述：一只{rng.choice('猫狗鸟马')}在{rng.choice(['草地', '沙滩', '街道'])}上"
                raw.write_text_line(handle, n_texts, caption, [image_id])
                n_texts += 1
    return {"images": n_images, "texts": n_texts, "image_bytes": image_bytes}


def plain_copy(root: Path, dest: Path) -> float:
    start = time.perf_counter()
    with open(dest, "wb") as out:
        for path in (raw.images_tsv_path(root, SPLIT), raw.texts_jsonl_path(root, SPLIT)):
            with open(path, "rb") as src:
                shutil.copyfileobj(src, out, 1 << 20)
        out.flush()
        os.fsync(out.fileno())
    return time.perf_counter() - start


def _decoded_chunks(root: Path, chunk: int = 2000) -> Iterator[list[bytes]]:
    # Base64 is decoded outside the timed regions, a chunk at a time, so Flickr30k-scale runs stay
    # within memory.
    batch: list[bytes] = []
    for line in raw.iter_image_lines(raw.images_tsv_path(root, SPLIT)):
        batch.append(binascii.a2b_base64(line.payload, strict_mode=True))
        if len(batch) == chunk:
            yield batch
            batch = []
    if batch:
        yield batch


def _full_decode(data: bytes) -> None:
    with Image.open(io.BytesIO(data)) as image:
        image.load()


def validation_floor(root: Path, threads: int) -> float:
    """Seconds for Pillow to fully decode every image on ``threads`` threads (Pillow drops the GIL)."""
    seconds = 0.0
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for decoded in _decoded_chunks(root):
            start = time.perf_counter()
            for _ in pool.map(_full_decode, decoded, chunksize=16):
                pass
            seconds += time.perf_counter() - start
    return seconds


def pil_checks(root: Path, min_side: int = 1) -> float:
    """Seconds for the build's own image checks alone on one thread."""
    seconds = 0.0
    for decoded in _decoded_chunks(root):
        start = time.perf_counter()
        for data in decoded:
            problem = check_image_bytes(data, min_side)
            assert problem is None, problem
        seconds += time.perf_counter() - start
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--size", default="500x375", help="photo-like images of WIDTHxHEIGHT pixels (default)")
    parser.add_argument("--image-kb", type=float, default=None, help="noise images of about this encoded size instead")
    parser.add_argument("--format", choices=["JPEG", "PNG", "mixed"], default="JPEG")
    parser.add_argument("--workers", type=int, default=None, help="image-check threads (default: by CPU count)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default: a fresh temporary one)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here (bench/benchjson.py)")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench_lmdb_build.", dir=args.dir))
    try:
        src = work / "src"
        t0 = time.perf_counter()
        width, height = (int(side) for side in args.size.lower().split("x"))
        sizes = generate(src / "raw", args.images, args.captions_per_image, args.image_kb, args.format, args.seed,
                         (width, height))
        generate_s = time.perf_counter() - t0
        input_bytes = sum(p.stat().st_size for p in (src / "raw").iterdir())
        records = sizes["images"] + sizes["texts"]

        # Warm the page cache equally for both measurements.
        plain_copy(src / "raw", work / "warmup.bin")
        (work / "warmup.bin").unlink()

        copy_s = plain_copy(src / "raw", work / "copy.bin")
        threads = args.workers or min(4, os.cpu_count() or 1)  # serialize_split's own default
        floor_s = validation_floor(src / "raw", threads)
        t0 = time.perf_counter()
        report = serialize_split("raw_tsv", src, SPLIT, work / "serialized", entry={"root": "raw"},
                                 progress=False, workers=threads)
        build_s = time.perf_counter() - t0
        checks_s = pil_checks(src / "raw")
        output_bytes = sum(p.stat().st_size for p in (work / "serialized").rglob("*") if p.is_file())

        with SplitStore(work / "serialized") as store:
            ids = store.image_ids()
            t0 = time.perf_counter()
            for image_id in ids:
                store.image_bytes(image_id)
            read_s = time.perf_counter() - t0
        assert report.images_kept == sizes["images"] and report.texts_kept == sizes["texts"]

        mb = input_bytes / 1e6
        figures = {
            "build_over_floor": round(build_s / floor_s, 3),
            "build_over_copy": round(build_s / copy_s, 2),
            "build_s": round(build_s, 3), "floor_s": round(floor_s, 3), "copy_s": round(copy_s, 3),
            "pil_checks_1thread_s": round(checks_s, 3),
            "random_read_images_per_s": round(len(ids) / read_s),
        }
        mean_kb = round(sizes["image_bytes"] / sizes["images"] / 1024, 1)
        shape = f"{args.image_kb} KB noise" if args.image_kb else f"{args.size} photo-like"
        print(f"input: {sizes['images']} images ({shape}, mean {mean_kb} KB {args.format}), "
              f"{sizes['texts']} texts, {mb:.1f} MB of tsv+jsonl; output {output_bytes / 1e6:.1f} MB; "
              f"{os.cpu_count()} CPUs, {threads} image-check threads (generation took {generate_s:.1f}s)")
        print(f"plain copy      : {copy_s:7.3f} s  {records / copy_s:12,.0f} records/s  {mb / copy_s:8.1f} MB/s")
        print(f"Pillow floor    : {floor_s:7.3f} s  full decode of every image on {threads} threads")
        print(f"serialize_split : {build_s:7.3f} s  {records / build_s:12,.0f} records/s  {mb / build_s:8.1f} MB/s")
        print(f"build / floor   : {build_s / floor_s:7.2f}x   goal <= 1.5")
        print(f"build / copy    : {build_s / copy_s:7.1f}x")
        print(f"the build's image checks alone, 1 thread: {checks_s:.3f} s ({sizes['images'] / checks_s:,.0f} images/s)")
        print(f"reader: {figures['random_read_images_per_s']:,} image_bytes() lookups/s")
        write_figures(args.json, "bench_lmdb_build", figures, images=sizes["images"], texts=sizes["texts"],
                      input_mb=round(mb, 1), mean_image_kb=mean_kb, images_kind=shape, format=args.format,
                      threads=threads, generate_s=round(generate_s, 2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
