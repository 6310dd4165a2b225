"""Extraction throughput: paddle.inference on an exported model against the dynamic graph, in one run.

    python bench/bench_inference.py [--images 500] [--threads N] [--arch '{"image_size": 224, ...}']

Both engines run the whole extraction path (LMDB read, decode, transform, tokenize, batch, encode,
write) of the same split and model, alternating, best of ``--repeats``. Prints images/s and
texts/s of each and the ratios inference / dynamic; above 1 the inference engine is faster.
The figures ``default_over_dynamic_images`` / ``_texts`` compare the schema's ``eval.engine``
default with the dynamic graph (1.0 when the default is the dynamic graph); the goal is >= 1.
``--arch`` overrides entries of the tiny ERNIE-ViL architecture (e.g. a wider, deeper one).

    python bench/bench_inference.py [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from benchjson import write_figures


def main() -> None:
    from vlretrieval.config import MODELS_SCHEMA, schema_default

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--image-batch-size", type=int, default=schema_default(MODELS_SCHEMA, "eval", "image_batch_size"))
    parser.add_argument("--text-batch-size", type=int, default=schema_default(MODELS_SCHEMA, "eval", "text_batch_size"))
    parser.add_argument("--threads", type=int, default=None, help="inference engine CPU threads (default: all)")
    parser.add_argument("--arch", type=json.loads, default={}, help="tiny architecture overrides (JSON)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="write the figures here (bench/benchjson.py)")
    args = parser.parse_args()

    import paddle

    from vlretrieval.data.demo import DemoSpec, write_demo_archive
    from vlretrieval.data.download import safe_extract
    from vlretrieval.data.lmdb_store import serialize_split
    from vlretrieval.models.export import default_threads, export_model
    from vlretrieval.models.prepare import prepare_initial_model, vocab_texts_from_split
    from vlretrieval.retrieval.extract import extract_split

    threads = args.threads or default_threads()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        image_size = int(args.arch.get("image_size", 64))
        spec = DemoSpec(name="bench", sizes={"test": args.images}, captions_per_image=args.captions_per_image,
                        image_size=image_size)
        write_demo_archive(spec, tmp / "bench.zip")
        safe_extract(tmp / "bench.zip", tmp / "raw")
        serialize_split("raw_tsv", tmp / "raw", "test", tmp / "lmdb", entry={"format": "raw_tsv", "root": "bench"},
                        progress=False)
        prepare_initial_model("ernie_vil", "tiny", tmp / "model", vocab_texts=vocab_texts_from_split(tmp / "lmdb"),
                              tiny_overrides=args.arch)
        manifest = export_model(tmp / "model", tmp / "export", threads=threads)

        def rates(engine: str) -> tuple[float, float]:
            model_dir = tmp / ("export" if engine == "inference" else "model")
            summary = extract_split(
                model_dir, tmp / "lmdb", tmp / f"features_{engine}", engine=engine, threads=threads,
                image_batch_size=args.image_batch_size, text_batch_size=args.text_batch_size, progress=False,
            )
            return summary["images_per_second"], summary["texts_per_second"]

        best = {"dynamic": [0.0, 0.0], "inference": [0.0, 0.0]}
        rates("dynamic"), rates("inference")  # warm-up: kernels, oneDNN primitives, allocator
        for _ in range(args.repeats):
            for engine in best:  # alternating, so a change in machine load hits both engines alike
                images, texts = rates(engine)
                best[engine] = [max(best[engine][0], images), max(best[engine][1], texts)]

    arch = ", ".join(f"{k}={v}" for k, v in args.arch.items()) or "default tiny"
    print(f"paddle {paddle.__version__}, ERNIE-ViL ({arch}), dim {manifest['embedding_dim']}, "
          f"{image_size}px images")
    print(f"{args.images} images, {args.images * args.captions_per_image} texts, batch sizes "
          f"{args.image_batch_size} / {args.text_batch_size}, inference engine on {threads} CPU threads "
          f"with oneDNN, best of {args.repeats}")
    print(f"{'':28}{'images/s':>12}{'texts/s':>12}")
    for engine, (images, texts) in best.items():
        print(f"{engine + ' engine':28}{images:12.1f}{texts:12.1f}")
    dynamic, inference = best["dynamic"], best["inference"]
    print(f"{'ratio (inference / dynamic)':28}{inference[0] / dynamic[0]:12.2f}{inference[1] / dynamic[1]:12.2f}")
    default = schema_default(MODELS_SCHEMA, "eval", "engine")
    figures = {
        "default_over_dynamic_images": round(best[default][0] / dynamic[0], 3),
        "default_over_dynamic_texts": round(best[default][1] / dynamic[1], 3),
        "inference_over_dynamic_images": round(inference[0] / dynamic[0], 3),
        "inference_over_dynamic_texts": round(inference[1] / dynamic[1], 3),
        "dynamic_images_per_s": round(dynamic[0], 1), "dynamic_texts_per_s": round(dynamic[1], 1),
        "inference_images_per_s": round(inference[0], 1), "inference_texts_per_s": round(inference[1], 1),
    }
    print(f"default engine (eval.engine): {default}; default / dynamic: images "
          f"{figures['default_over_dynamic_images']:.2f}, texts {figures['default_over_dynamic_texts']:.2f}   goal >= 1")
    write_figures(args.json, "bench_inference", figures, default_engine=default, images=args.images,
                  texts=args.images * args.captions_per_image, image_batch_size=args.image_batch_size,
                  text_batch_size=args.text_batch_size, threads=threads, arch=args.arch, image_size=image_size,
                  repeats=args.repeats)


if __name__ == "__main__":
    main()
