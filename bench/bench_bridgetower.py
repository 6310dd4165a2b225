"""BridgeTower retrieval: ITC first stage plus ITM re-ranking, cost and recall at several k.

    python bench/bench_bridgetower.py [--images 1000] [--k 16 64 128] [--batch-size 256] [--threads N]
                                      [--model DIR] [--dir DIR] [--json PATH]

Builds a synthetic English test split (the ``demo_en`` generator, ``--images`` images x 5
captions, no region features) the way the workflow does (archive -> raw files -> LMDB split), then:

* ``first_stage`` (timed once): scorer construction (model load, tokenization, uni-modal states
  of every text and image), the ITC features of every text and image, and the exact top ``max(k)``
  of the ITC similarities in both directions. The top ``k`` of a smaller ``k`` is a prefix of the
  larger one (``select_topk`` is exact and stable), so every ``k`` reuses a slice of it;
* ``itc``: the ITC ranking alone (top 10, no re-ranking), for reference;
* ``rerank[k]``: the ITM head scores the union of the candidate pairs and re-orders the lists
  (``rerank_candidates``). The whole evaluation time of a ``k`` is the first stage plus its
  re-ranking.

The ITM rate (pairs scored per second) is the total over all re-rankings. Recall (R@1/5/10 both
directions, mean recall) is computed from prediction files against the split's gold
``texts.jsonl``. The model defaults to the trained ``demo_en`` one under ``work/``; if missing, an
untrained tiny BridgeTower is used instead, which keeps the cost numbers valid but puts recall at
chance level (the JSON says which). Prints a JSON summary; ``--json`` writes the figures by name.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_rerank import _model, _recall, _write  # noqa: E402
from benchjson import write_figures  # noqa: E402

SPLIT = "test"
NAME = "bench_bridgetower"
FAMILY = "bridgetower"
DEFAULT_MODEL = ROOT / "work" / "demo_en" / "bridgetower" / "models" / "finetuned"
# The demo_en generator's image size (config/datasets.yaml); the model's transform resizes.
IMAGE_SIZE = 64


def _build_split(work: Path, images: int, captions: int, seed: int) -> tuple[Path, float]:
    """Generate, extract and serialize the split; returns (split dir, seconds)."""
    from vlretrieval.data.demo import DemoSpec, write_demo_archive
    from vlretrieval.data.download import safe_extract
    from vlretrieval.data.lmdb_store import serialize_split

    started = time.perf_counter()
    spec = DemoSpec(name=NAME, seed=seed, sizes={SPLIT: images}, image_size=IMAGE_SIZE,
                    captions_per_image=captions, caption_language="en", regions=False)
    write_demo_archive(spec, work / f"{NAME}.zip")
    safe_extract(work / f"{NAME}.zip", work / "download")
    split_dir = work / "lmdb" / SPLIT
    serialize_split("raw_tsv", work / "download", SPLIT, split_dir, entry={"format": "raw_tsv", "root": NAME},
                    progress=False)
    return split_dir, time.perf_counter() - started


def _model_info(model_dir: Path) -> dict:
    path = model_dir / "vlretrieval_model.json"
    if not path.is_file():
        return {}
    info = json.loads(path.read_text())
    return {key: info.get(key) for key in ("image_size", "eval_max_len", "itc_dim", "global_step")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000, help="test images (1,000: the COCO 1K protocol)")
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--k", type=int, nargs="+", default=[16, 64, 128],
                        help="ITC candidates per query to re-rank (a k larger than the gallery is skipped)")
    parser.add_argument("--batch-size", type=int, default=256, help="pairs per ITM forward pass")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU math-library threads (OMP/MKL/OpenBLAS; default: the libraries' own)")
    parser.add_argument("--seed", type=int, default=5, help="generator seed of the test split")
    parser.add_argument("--model", type=Path, default=None,
                        help=f"BridgeTower model directory (default: {DEFAULT_MODEL.relative_to(ROOT)} if present)")
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default: a fresh temporary one)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here, by name")
    args = parser.parse_args(argv)
    if min(args.k) < 10:
        parser.error("every --k must be at least 10 (R@10 needs 10 candidates per query)")
    if args.images < 10:
        parser.error("--images must be at least 10 (R@10 needs 10 images)")
    ks = sorted({k for k in args.k if k <= args.images})
    skipped = sorted({k for k in args.k if k > args.images})
    if not ks:
        parser.error(f"every --k exceeds the gallery of {args.images} images")
    if args.threads:
        # Read by the math libraries when paddle loads them, so set before the first import.
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[name] = str(args.threads)

    import numpy as np
    import paddle

    from vlretrieval.models.bridgetower import BridgeTowerPairScorer
    from vlretrieval.retrieval.rerank import itc_candidate_positions, rerank_candidates

    paddle.set_device("cpu")
    max_k = ks[-1]
    with tempfile.TemporaryDirectory(prefix=f"{NAME}.", dir=args.dir) as tmp:
        work = Path(tmp)
        split_dir, data_s = _build_split(work, args.images, args.captions_per_image, args.seed)
        model_dir, origin = _model(args.model, DEFAULT_MODEL, FAMILY, work, split_dir)

        # Warm-up (kernels, allocator) outside every timed section: a scorer without state caches
        # (nothing encoded up front) scores one image against one batch of texts.
        with BridgeTowerPairScorer(model_dir, split_dir, batch_size=args.batch_size, cache_bytes=0) as warm:
            n_warm = min(len(warm.text_ids), args.batch_size)
            warm.score(0, np.arange(n_warm))
            texts_states = warm._encode_texts(np.arange(min(len(warm.text_ids), 8)))
            image_states = warm._encode_images(np.arange(min(len(warm.image_ids), 8)))
            warm.model.itc_text_features(texts_states)
            warm.model.itc_image_features(image_states)
        del warm, texts_states, image_states

        # First stage, timed once: construction (uni-modal states), ITC features, top max(k).
        started = time.perf_counter()
        scorer = BridgeTowerPairScorer(model_dir, split_dir, batch_size=args.batch_size)
        setup_s = time.perf_counter() - started
        started = time.perf_counter()
        scorer.itc_features()
        features_s = time.perf_counter() - started
        started = time.perf_counter()
        t2i_cands, i2t_cands = itc_candidate_positions(scorer, max_k)
        topk_s = time.perf_counter() - started
        first_stage_s = setup_s + features_s + topk_s
        n_texts, n_images = len(scorer.text_ids), len(scorer.image_ids)

        # ITC alone: its own top 10 (features are cached, so only the search is timed again).
        started = time.perf_counter()
        itc_t2i, itc_i2t = itc_candidate_positions(scorer, 10)
        itc_topk_s = time.perf_counter() - started
        if not (np.array_equal(itc_t2i, t2i_cands[:, :10]) and np.array_equal(itc_i2t, i2t_cands[:, :10])):
            raise SystemExit("the ITC top 10 is not a prefix of the top max(k): candidate slices are invalid")
        itc_dir = _write(scorer, scorer.image_ids[itc_t2i], scorer.text_ids[itc_i2t], work / "pred" / "itc")
        itc_recall = _recall(split_dir, scorer, itc_dir)

        reranks = {}
        total_pairs, total_rerank_s = 0, 0.0
        for k in ks:
            t2i, i2t, stats = rerank_candidates(scorer, t2i_cands[:, :k], i2t_cands[:, :k])
            pred = _write(scorer, t2i, i2t, work / "pred" / f"k{k}")
            total_pairs += stats.pairs_scored
            total_rerank_s += stats.seconds
            reranks[str(k)] = {
                "pairs": stats.pairs_scored,
                "pairs_per_second": round(stats.pairs_scored / stats.seconds, 1),
                "seconds_rerank": round(stats.seconds, 3),
                "seconds_total": round(first_stage_s + stats.seconds, 3),
                "recall": _recall(split_dir, scorer, pred),
            }
        scorer.close()

    rate = total_pairs / total_rerank_s
    for entry in reranks.values():
        entry["mean_recall_minus_itc"] = round(entry["recall"]["mean_recall"] - itc_recall["mean_recall"], 2)
    notes = []
    if origin == "untrained tiny":
        notes.append("the BridgeTower model is untrained (no trained model found): ITC and re-ranked recall are "
                     "chance level; the cost numbers are valid")
    if skipped:
        notes.append(f"k {skipped} skipped: larger than the gallery of {args.images} images")
    result = {
        "benchmark": "BridgeTower retrieval: ITC first stage + ITM re-ranking",
        "paddle": paddle.__version__,
        "threads": args.threads,
        "batch_size": args.batch_size,
        "split": {"images": n_images, "texts": n_texts, "seed": args.seed, "image_size": IMAGE_SIZE,
                  "build_seconds": round(data_s, 2)},
        "model": origin,
        "model_dir": str(model_dir) if origin != "untrained tiny" else None,
        "model_info": _model_info(model_dir) if origin != "untrained tiny" else {},
        "itm_pairs_per_second": round(rate, 1),
        "first_stage": {
            "k": max_k,
            "seconds_setup": round(setup_s, 3),
            "seconds_itc_features": round(features_s, 3),
            "seconds_topk": round(topk_s, 3),
            "seconds": round(first_stage_s, 3),
        },
        "itc": {
            "k": 10,
            "seconds": round(setup_s + features_s + itc_topk_s, 3),
            "recall": itc_recall,
        },
        "rerank": reranks,
        "notes": notes,
    }
    print(json.dumps(result, indent=2))
    figures = {
        "itm_pairs_per_second": rate,
        "first_stage_s": first_stage_s,
        "itc_s": setup_s + features_s + itc_topk_s,
        "itc_mean_recall": itc_recall["mean_recall"],
    }
    for k, entry in reranks.items():
        figures[f"rerank_k{k}_total_s"] = first_stage_s + entry["seconds_rerank"]
        figures[f"rerank_k{k}_total_over_itc"] = figures[f"rerank_k{k}_total_s"] / figures["itc_s"]
        figures[f"rerank_k{k}_mean_recall"] = entry["recall"]["mean_recall"]
        figures[f"rerank_k{k}_mean_recall_minus_itc"] = entry["mean_recall_minus_itc"]
    write_figures(args.json, "bench_bridgetower", figures,
                  **{name: value for name, value in result.items() if name != "benchmark"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
