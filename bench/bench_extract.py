"""Extraction throughput: the whole path (LMDB read, decode, transform, batch, forward, write) against
the model's forward pass alone on tensors already in memory.

    python bench/bench_extract.py [--images 2000] [--batch-size 64]

Goal: ratio >= 0.8, i.e. the data path is not the bottleneck. Uses the tiny ERNIE-ViL on demo images.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    from vlretrieval.config import MODELS_SCHEMA, schema_default

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=schema_default(MODELS_SCHEMA, "eval", "image_batch_size"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import paddle

    from vlretrieval.data.demo import DemoSpec, write_demo_archive
    from vlretrieval.data.download import safe_extract
    from vlretrieval.data.lmdb_store import serialize_split
    from vlretrieval.models.prepare import prepare_initial_model, vocab_texts_from_split
    from vlretrieval.models.base import load_model_dir
    from vlretrieval.models.datasets import image_loader
    from vlretrieval.retrieval.extract import extract_split

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        spec = DemoSpec(name="bench", sizes={"test": args.images}, captions_per_image=1)
        write_demo_archive(spec, tmp / "bench.zip")
        safe_extract(tmp / "bench.zip", tmp / "raw")
        entry = {"format": "raw_tsv", "root": "bench"}
        serialize_split("raw_tsv", tmp / "raw", "test", tmp / "lmdb", entry=entry, progress=False)
        prepare_initial_model("ernie_vil", "tiny", tmp / "model", vocab_texts=vocab_texts_from_split(tmp / "lmdb"))

        family, model, _, _ = load_model_dir(tmp / "model")
        transform = family.image_transform(model, train=False)
        batches = [b["pixel_values"] for b in image_loader(tmp / "lmdb", transform, batch_size=args.batch_size)]
        n = sum(int(b.shape[0]) for b in batches)

        def forward_only() -> float:
            started = time.perf_counter()
            with paddle.no_grad():
                for pixels in batches:
                    model.encode_images(pixels).numpy()
            return time.perf_counter() - started

        def whole_path_rate() -> float:
            # extract_split times its image pass (read, decode, transform, batch, forward) on its own.
            summary = extract_split(
                tmp / "model", tmp / "lmdb", tmp / "features", engine="dynamic", image_batch_size=args.batch_size,
                text_batch_size=schema_default(MODELS_SCHEMA, "eval", "text_batch_size"), progress=False,
            )
            return summary["images_per_second"]

        forward_only()  # warm-up: kernels, allocator
        forward_rate = n / min(forward_only() for _ in range(args.repeats))
        path_rate = max(whole_path_rate() for _ in range(args.repeats))

    print(f"images: {n}, batch size {args.batch_size}, tiny ERNIE-ViL on CPU, best of {args.repeats}")
    print(f"forward on in-memory tensors : {forward_rate:9.1f} images/s")
    print(f"whole extraction path        : {path_rate:9.1f} images/s")
    print(f"ratio (path / forward)       : {path_rate / forward_rate:9.2f}   goal >= 0.80")


if __name__ == "__main__":
    main()
