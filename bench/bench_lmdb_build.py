"""Benchmark: building a serialized split versus plainly copying the same raw bytes.

Generates a synthetic raw split (``{split}_imgs.tsv`` + ``{split}_texts.jsonl``) of distinct
noise images, then times

* ``serialize_split`` (strict base64, Pillow verify + decode, duplicate and reference checks,
  two LMDB environments, the gold jsonl and the report),
* a sequential copy of the tsv and jsonl into another file with a final fsync: the I/O floor,
* the Pillow checks alone on one thread, to show how much of the build they account for.

Usage::

    python bench/bench_lmdb_build.py [--images 5000] [--captions-per-image 5] [--image-kb 20]
"""

from __future__ import annotations

import argparse
import binascii
import io
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlretrieval.data import raw  # noqa: E402
from vlretrieval.data.lmdb_store import SplitStore, serialize_split  # noqa: E402
from vlretrieval.data.validation import check_image_bytes  # noqa: E402

SPLIT = "train"


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"quality": 75} if fmt == "JPEG" else {"compress_level": 1}))
    return buffer.getvalue()


def _side_for(rng: random.Random, fmt: str, target_bytes: int) -> int:
    # Noise barely compresses, so encoded size grows with the pixel count; measure the rate once.
    probe = 128
    size = len(_encode(Image.frombytes("RGB", (probe, probe), rng.randbytes(probe * probe * 3)), fmt))
    return max(8, int(probe * (target_bytes / size) ** 0.5))


def _noise_image(rng: random.Random, fmt: str, side: int) -> bytes:
    return _encode(Image.frombytes("RGB", (side, side), rng.randbytes(side * side * 3)), fmt)


def generate(root: Path, n_images: int, captions_per_image: int, image_kb: float, fmt: str, seed: int) -> dict:
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    image_bytes = 0
    sides = {kind: _side_for(rng, kind, int(image_kb * 1024)) for kind in ("JPEG", "PNG")}
    with open(raw.images_tsv_path(root, SPLIT), "w", encoding="utf-8") as handle:
        for image_id in range(n_images):
            kind = fmt if fmt != "mixed" else ("JPEG" if image_id % 2 else "PNG")
            data = _noise_image(rng, kind, sides[kind])
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


def pil_only(root: Path, min_side: int = 1) -> float:
    # Decode base64 outside the timed region: this isolates what Pillow costs per build.
    decoded = [binascii.a2b_base64(line.payload, strict_mode=True)
               for line in raw.iter_image_lines(raw.images_tsv_path(root, SPLIT))]
    start = time.perf_counter()
    for data in decoded:
        problem = check_image_bytes(data, min_side)
        assert problem is None, problem
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--image-kb", type=float, default=20.0, help="approximate encoded size of each image")
    parser.add_argument("--format", choices=["JPEG", "PNG", "mixed"], default="JPEG")
    parser.add_argument("--workers", type=int, default=None, help="image-check threads (default: by CPU count)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default: a fresh temporary one)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench_lmdb_build.", dir=args.dir))
    try:
        src = work / "src"
        t0 = time.perf_counter()
        sizes = generate(src / "raw", args.images, args.captions_per_image, args.image_kb, args.format, args.seed)
        generate_s = time.perf_counter() - t0
        input_bytes = sum(p.stat().st_size for p in (src / "raw").iterdir())
        records = sizes["images"] + sizes["texts"]

        # Warm the page cache equally for both measurements.
        plain_copy(src / "raw", work / "warmup.bin")
        (work / "warmup.bin").unlink()

        copy_s = plain_copy(src / "raw", work / "copy.bin")
        t0 = time.perf_counter()
        report = serialize_split("raw_tsv", src, SPLIT, work / "serialized", entry={"root": "raw"},
                                 progress=False, workers=args.workers)
        build_s = time.perf_counter() - t0
        pil_s = pil_only(src / "raw")
        output_bytes = sum(p.stat().st_size for p in (work / "serialized").rglob("*") if p.is_file())

        with SplitStore(work / "serialized") as store:
            ids = store.image_ids()
            t0 = time.perf_counter()
            for image_id in ids:
                store.image_bytes(image_id)
            read_s = time.perf_counter() - t0
        assert report.images_kept == sizes["images"] and report.texts_kept == sizes["texts"]

        mb = input_bytes / 1e6
        results = {
            "images": sizes["images"], "texts": sizes["texts"], "input_mb": round(mb, 1),
            "mean_image_kb": round(sizes["image_bytes"] / sizes["images"] / 1024, 1),
            "output_mb": round(output_bytes / 1e6, 1), "cpus": os.cpu_count(), "generate_s": round(generate_s, 2),
            "copy_s": round(copy_s, 3), "build_s": round(build_s, 3), "pil_checks_1thread_s": round(pil_s, 3),
            "ratio_build_over_copy": round(build_s / copy_s, 1),
            "random_read_images_per_s": round(len(ids) / read_s),
        }
        print(f"input: {sizes['images']} images (~{results['mean_image_kb']} KB {args.format}), "
              f"{sizes['texts']} texts, {mb:.1f} MB of tsv+jsonl; output {results['output_mb']} MB; "
              f"{os.cpu_count()} CPUs (generation took {generate_s:.1f}s)")
        print(f"plain copy      : {copy_s:7.3f} s  {records / copy_s:12,.0f} records/s  {mb / copy_s:8.1f} MB/s")
        print(f"serialize_split : {build_s:7.3f} s  {records / build_s:12,.0f} records/s  {mb / build_s:8.1f} MB/s")
        print(f"ratio build/copy: {build_s / copy_s:.1f}x")
        threads = args.workers or min(4, os.cpu_count() or 1)
        print(f"Pillow checks alone, 1 thread: {pil_s:.3f} s ({sizes['images'] / pil_s:,.0f} images/s); "
              f"build without them ~{max(build_s - pil_s, 0):.3f} s (approximate: the build runs the "
              f"checks on {threads} thread{'s' if threads > 1 else ''})")
        print(f"reader: {results['random_read_images_per_s']:,} image_bytes() lookups/s")
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
