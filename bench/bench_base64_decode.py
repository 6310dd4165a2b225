"""Benchmark: decoding image payloads in every base64 spelling, against strict standard-only decoding.

Generates distinct noise JPEGs, spells each one's base64 three ways (standard padded, URL-safe
padded, URL-safe unpadded) and times

* ``binascii.a2b_base64(strict_mode=True)`` on the standard spellings: the baseline, which is what
  the serializer used before it took the URL-safe alphabet and unpadded payloads;
* :func:`vlretrieval.data.base64_payload.decode_base64` on each spelling;
* ``serialize_split`` of the same raw split written in the standard spelling and in the URL-safe
  unpadded one (base64, every image check, the LMDB), to show what the spelling costs a whole build.

Each figure is the best of ``--repeats`` passes. Usage::

    python bench/bench_base64_decode.py [--images 2000] [--image-kb 20] [--repeats 5] [--json FILE]
"""

from __future__ import annotations

import argparse
import base64
import binascii
import io
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchjson import write_figures  # noqa: E402

from vlretrieval.data import raw  # noqa: E402
from vlretrieval.data.base64_payload import decode_base64  # noqa: E402
from vlretrieval.data.lmdb_store import SplitStore, serialize_split  # noqa: E402

SPLIT = "test"


def noise_jpegs(n_images: int, image_kb: float, seed: int) -> list[bytes]:
    rng = random.Random(seed)

    def encode(side: int) -> bytes:
        buffer = io.BytesIO()
        Image.frombytes("RGB", (side, side), rng.randbytes(side * side * 3)).save(buffer, "JPEG", quality=75)
        return buffer.getvalue()

    # Noise barely compresses, so the encoded size grows with the pixel count: measure the rate once.
    probe = 128
    side = max(8, int(probe * (image_kb * 1024 / len(encode(probe))) ** 0.5))
    return [encode(side) for _ in range(n_images)]


def best_of(repeats: int, run: Callable[[], object]) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def write_split(root: Path, payloads: Sequence[str]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    with open(raw.images_tsv_path(root, SPLIT), "w", encoding="utf-8") as handle:
        for image_id, payload in enumerate(payloads):
            handle.write(f"{image_id}\t{payload}\n")
    with open(raw.texts_jsonl_path(root, SPLIT), "w", encoding="utf-8") as handle:
        for image_id in range(len(payloads)):
            raw.write_text_line(handle, image_id, f"第{image_id}张图片", [image_id])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--image-kb", type=float, default=20.0, help="approximate encoded size of each image")
    parser.add_argument("--repeats", type=int, default=5, help="passes per figure; the best one counts")
    parser.add_argument("--build-repeats", type=int, default=3, help="serializations per spelling; the best counts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default: a fresh temporary one)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here, by name")
    args = parser.parse_args(argv)

    images = noise_jpegs(args.images, args.image_kb, args.seed)
    spellings = {
        "standard": [base64.b64encode(data).decode("ascii") for data in images],
        "url_safe": [base64.urlsafe_b64encode(data).decode("ascii") for data in images],
        "url_safe_unpadded": [base64.urlsafe_b64encode(data).decode("ascii").rstrip("=") for data in images],
    }
    # Every spelling must decode to the original bytes, or the times compare different work.
    for name, payloads in spellings.items():
        assert [decode_base64(p)[0] for p in payloads] == images, name

    baseline_s = best_of(args.repeats, lambda: [binascii.a2b_base64(p, strict_mode=True)
                                                 for p in spellings["standard"]])
    decode_s = {name: best_of(args.repeats, lambda payloads=payloads: [decode_base64(p) for p in payloads])
                for name, payloads in spellings.items()}

    work = Path(tempfile.mkdtemp(prefix="bench_base64_decode.", dir=args.dir))
    try:
        names = ("standard", "url_safe_unpadded")
        for name in names:
            write_split(work / name / "raw", spellings[name])
        # Interleaved, so a change in the machine's load during the run affects both spellings alike.
        build_times: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(args.build_repeats):
            for name in names:
                out = work / "out" / name
                shutil.rmtree(out, ignore_errors=True)
                start = time.perf_counter()
                serialize_split("raw_tsv", work / name, SPLIT, out, entry={"root": "raw"}, progress=False)
                build_times[name].append(time.perf_counter() - start)
                with SplitStore(out) as store:
                    assert store.num_images == len(images) and store.image_bytes(len(images) - 1) == images[-1]
        build_s = {name: min(times) for name, times in build_times.items()}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    figures = {
        "standard_over_strict": decode_s["standard"] / baseline_s,
        "url_safe_over_strict": decode_s["url_safe"] / baseline_s,
        "url_safe_unpadded_over_strict": decode_s["url_safe_unpadded"] / baseline_s,
        "url_safe_build_over_standard_build": build_s["url_safe_unpadded"] / build_s["standard"],
        "strict_decode_s": baseline_s,
        "standard_decode_s": decode_s["standard"],
        "url_safe_decode_s": decode_s["url_safe"],
        "url_safe_unpadded_decode_s": decode_s["url_safe_unpadded"],
        "standard_build_s": build_s["standard"],
        "url_safe_unpadded_build_s": build_s["url_safe_unpadded"],
    }
    mean_kb = sum(map(len, images)) / len(images) / 1024
    print(f"{len(images)} images of {mean_kb:.1f} KB; best of {args.repeats} decode passes, "
          f"{args.build_repeats} builds")
    for name, value in figures.items():
        print(f"  {name:38s} {value:.4f}")
    if args.json:
        write_figures(args.json, "bench_base64_decode", figures, images=len(images), mean_image_kb=round(mean_kb, 1),
                      repeats=args.repeats, build_repeats=args.build_repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
