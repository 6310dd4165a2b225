"""CPU throughput and memory of every family at its published size (``init: random``).

    python bench/bench_published.py [--families ernie_vil,...] [--images 8] [--batches 2,4]
                                    [--train-steps 3] [--threads 2] [--json FILE]

Builds an English demo split with detector regions (``--images`` images, 5 captions each) and, per
family, the initial model of ``init: random`` (the published architecture, random weights). Then,
each measurement in a fresh process so its peak RSS is its own:

- ``<family>_train_b<B>_samples_per_s`` and ``..._peak_rss_mb``: one-rank fine-tuning
  (:func:`vlretrieval.training.finetune.finetune`, no recompute) at per-device batch ``B``; samples/s
  over the steps after the first (which pays for lazy initialisation), and
  ``<family>_train_b<max>_over_b<min>``, the samples/s of the largest batch over the smallest;
- ``<family>_train_rss_mb_per_sample``: the slope of the peak RSS between the smallest and the
  largest batch, the activation memory one more training sample costs;
- dual encoders: ``<family>_images_per_s`` and ``<family>_texts_per_s`` from feature extraction
  (:func:`vlretrieval.retrieval.extract.extract_split`, the dynamic graph) and its peak RSS;
- cross encoders: ``<family>_itm_pairs_per_s``, every (image, caption) pair of the split scored by the
  family's pair scorer, and its peak RSS.

Each throughput is also given per core-second (``..._per_core_s``: divided by the cores the process
had on average, its CPU seconds over its wall seconds), which on a machine shared with other jobs
depends far less on them. ``<family>_parameters`` is the parameter count of the built model. docs/published_size.md turns these
figures into what a real pair costs here and what it needs on a GPU.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import tempfile
import time
import zipfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable

from benchjson import write_figures

FAMILIES = ("ernie_vil", "chinese_clip", "bert_clip", "vinvl", "bridgetower")
TRAIN_MAX_LEN = 32
EVAL_MAX_LEN = 32


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class _Cores:
    """How many cores a stretch of work had on average (CPU seconds over wall seconds): on a shared
    machine a throughput divided by it, per core-second, depends far less on the other jobs."""

    def __enter__(self) -> "_Cores":
        self._cpu, self._wall = _cpu_seconds(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cores = (_cpu_seconds() - self._cpu) / (time.perf_counter() - self._wall)


def _in_fresh_process(function: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """``function(*args)`` in a new interpreter (spawned, so it inherits no memory of this one; not a
    daemon, so extraction may start its own batch-preparing processes)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def _set_threads(threads: int) -> None:
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)


def _prepare_split(root: Path, images: int) -> tuple[Path, Path, list[str]]:
    from vlretrieval.data import regions
    from vlretrieval.data.demo import DemoSpec, write_demo_archive
    from vlretrieval.data.lmdb_store import serialize_split
    from vlretrieval.models.prepare import vocab_texts_from_split

    spec = DemoSpec(name="demo_published", seed=2, sizes={"train": images}, caption_language="en", regions=True)
    write_demo_archive(spec, root / "demo.zip")
    with zipfile.ZipFile(root / "demo.zip") as archive:
        archive.extractall(root / "dl")
    entry = {"format": "raw_tsv", "root": spec.name,
             "regions": {"features": "{split}_features.tsv", "predictions": "{split}_predictions.tsv"}}
    serialize_split("raw_tsv", root / "dl", "train", root / "lmdb", entry=entry, progress=False, workers=1)
    regions.serialize_split_regions(root / "dl", entry, "train", root / "lmdb", root / "regions")
    return root / "lmdb", root / "regions", vocab_texts_from_split(root / "lmdb")


def _prepare_model(family_name: str, out: str, vocab_texts: list[str], threads: int) -> dict[str, Any]:
    _set_threads(threads)
    import numpy as np

    from vlretrieval.models.base import load_model_dir
    from vlretrieval.models.prepare import prepare_initial_model

    prepare_initial_model(family_name, "random", out, vocab_texts=vocab_texts, seed=0)
    model = load_model_dir(out).model
    return {"parameters": sum(int(np.prod(p.shape)) for p in model.parameters())}


def _train(model_dir: str, split: str, regions: str, work: str, batch: int, steps: int, threads: int) -> dict[str, Any]:
    _set_threads(threads)
    from vlretrieval.models.base import read_model_info
    from vlretrieval.models.registry import get_family
    from vlretrieval.training.checkpoints import TRAIN_LOG, read_train_log
    from vlretrieval.training.finetune import finetune

    family = get_family(read_model_info(model_dir)["family"])
    hparams = {"per_device_train_batch_size": batch, "max_steps": steps, "save_steps": 10 * steps,
               "warmup_steps": 0, "learning_rate": 1e-5, "hflip": False, "recompute": False,
               "train_max_len": TRAIN_MAX_LEN, "crop_scale": None, "randaugment": None, "seed": 1}
    with _Cores() as used:
        finetune(model_dir, split, Path(work) / "run", Path(work) / "final", hparams=hparams, device="cpu",
                 disable_tqdm=True, regions=regions if "regions" in family.extra_inputs else None)
    records = [r for r in read_train_log(Path(work) / "run" / TRAIN_LOG) if r["event"] == "train"]
    elapsed = records[-1]["time"] - records[0]["time"]
    samples_per_s = (len(records) - 1) * batch / elapsed
    return {"samples_per_s": samples_per_s, "samples_per_core_s": samples_per_s / used.cores,
            "peak_rss_mb": _peak_rss_mb()}


def _extract(model_dir: str, split: str, out: str, threads: int) -> dict[str, Any]:
    _set_threads(threads)
    from vlretrieval.retrieval.extract import extract_split

    extract_split(model_dir, split, out, engine="dynamic", threads=threads, max_len=EVAL_MAX_LEN,
                  image_batch_size=8, text_batch_size=32, progress=False)  # warm-up: lazy initialisation
    with _Cores() as used:
        summary = extract_split(model_dir, split, out + "_measured", engine="dynamic", threads=threads,
                                max_len=EVAL_MAX_LEN, image_batch_size=8, text_batch_size=32, progress=False)
    return {"images_per_s": summary["images_per_second"], "texts_per_s": summary["texts_per_second"],
            "images_per_core_s": summary["images_per_second"] / used.cores,
            "texts_per_core_s": summary["texts_per_second"] / used.cores, "peak_rss_mb": _peak_rss_mb()}


def _score_pairs(model_dir: str, split: str, regions: str, threads: int) -> dict[str, Any]:
    _set_threads(threads)
    import numpy as np

    from vlretrieval.models.base import model_dir_family

    family = model_dir_family(model_dir)
    scorer = family.pair_scorer(model_dir, split, regions=regions, batch_size=32, max_len=EVAL_MAX_LEN)
    texts = np.arange(len(scorer.text_ids))
    scorer.score(0, texts)  # warm-up: lazy initialisation and the first image's states
    started = time.perf_counter()
    with _Cores() as used:
        for image in range(1, len(scorer.image_ids)):
            scorer.score(image, texts)
    seconds = time.perf_counter() - started
    getattr(scorer, "close", lambda: None)()
    pairs_per_s = (len(scorer.image_ids) - 1) * len(texts) / seconds
    return {"pairs_per_s": pairs_per_s, "pairs_per_core_s": pairs_per_s / used.cores, "peak_rss_mb": _peak_rss_mb()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--images", type=int, default=8, help="images of the demo split (5 captions each)")
    parser.add_argument("--batches", default="2,4", help="per-device training batches, smallest first")
    parser.add_argument("--train-steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    families = [name.strip() for name in args.families.split(",") if name.strip()]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        parser.error(f"unknown families {unknown}; known: {', '.join(FAMILIES)}")
    batches = sorted(int(b) for b in args.batches.split(","))
    if args.train_steps < 2 or len(batches) < 2 or batches[-1] * args.train_steps > 5 * args.images:
        parser.error("need 2+ training steps, 2+ batch sizes, and 5 x --images captions for the largest batch's steps")

    from vlretrieval.models.registry import DUAL_ENCODER, family_spec

    figures: dict[str, float] = {}
    load_before = os.getloadavg()[0]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench_published_") as tmp:
        root = Path(tmp)
        split, regions, vocab_texts = _prepare_split(root, args.images)
        for name in families:
            model_dir = str(root / name / "init")
            built = _in_fresh_process(_prepare_model, name, model_dir, vocab_texts, args.threads)
            figures[f"{name}_parameters"] = built["parameters"]
            rss = {}
            for batch in batches:
                trained = _in_fresh_process(_train, model_dir, str(split), str(regions),
                                            str(root / name / f"train_b{batch}"), batch, args.train_steps, args.threads)
                figures[f"{name}_train_b{batch}_samples_per_s"] = trained["samples_per_s"]
                figures[f"{name}_train_b{batch}_samples_per_core_s"] = trained["samples_per_core_s"]
                figures[f"{name}_train_b{batch}_peak_rss_mb"] = rss[batch] = trained["peak_rss_mb"]
            figures[f"{name}_train_rss_mb_per_sample"] = (rss[batches[-1]] - rss[batches[0]]) / (batches[-1] - batches[0])
            # Batching efficiency: samples/s of the largest batch over the smallest, both measured here.
            figures[f"{name}_train_b{batches[-1]}_over_b{batches[0]}"] = (
                figures[f"{name}_train_b{batches[-1]}_samples_per_s"] / figures[f"{name}_train_b{batches[0]}_samples_per_s"]
            )
            if family_spec(name).kind == DUAL_ENCODER:
                extracted = _in_fresh_process(_extract, model_dir, str(split), str(root / name / "features"), args.threads)
                figures[f"{name}_images_per_s"] = extracted["images_per_s"]
                figures[f"{name}_texts_per_s"] = extracted["texts_per_s"]
                figures[f"{name}_images_per_core_s"] = extracted["images_per_core_s"]
                figures[f"{name}_texts_per_core_s"] = extracted["texts_per_core_s"]
                figures[f"{name}_extract_peak_rss_mb"] = extracted["peak_rss_mb"]
            else:
                scored = _in_fresh_process(_score_pairs, model_dir, str(split), str(regions), args.threads)
                figures[f"{name}_itm_pairs_per_s"] = scored["pairs_per_s"]
                figures[f"{name}_itm_pairs_per_core_s"] = scored["pairs_per_core_s"]
                figures[f"{name}_score_peak_rss_mb"] = scored["peak_rss_mb"]
            for key in sorted(k for k in figures if k.startswith(name + "_")):
                print(f"{key}: {figures[key]:.4g}", flush=True)
    write_figures(args.json, "bench_published", figures, families=families, images=args.images, batches=batches,
                  train_steps=args.train_steps, threads=args.threads, train_max_len=TRAIN_MAX_LEN,
                  eval_max_len=EVAL_MAX_LEN, load_average_before=load_before,
                  load_average_after=os.getloadavg()[0], wall_s=time.monotonic() - started)


if __name__ == "__main__":
    main()
