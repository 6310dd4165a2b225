"""Cross-encoder retrieval (VinVL): exhaustive scoring against two-stage re-ranking, cost and recall.

    python bench/bench_rerank.py [--images 1000] [--k 20] [--batch-size 256] [--threads N]
                                 [--vinvl-model DIR] [--candidates-model DIR] [--json PATH]

Builds a synthetic English test split with detector-like region features (the ``demo_en``
generator, ``--images`` images x 5 captions; 1,000 images is the size of the COCO 1K test) the
way the workflow does (archive -> raw files -> LMDB split -> region store), then on that split:
its images come from ``--seed``, its region appearance vectors (the demo's "detector") from
``demo_en``'s seed unless ``--appearance-seed`` says otherwise, so that a VinVL trained on
``demo_en`` reads them as its own detector's features.

* ``exhaustive``: the VinVL cross encoder scores every (text, image) pair
  (``rank_exhaustive``); its rate is the benchmark's pairs per second;
* ``two_stage``: a dual encoder's features (``extract_split``, dynamic engine) give each query its
  top ``--k`` candidates (``candidate_positions``); the cross encoder scores the union of those
  pairs and re-orders the lists (``rerank_candidates``). Seconds are given for the re-ranking alone
  and with the first stage (extraction + candidate search) included;
* ``dense``: the dual encoder's own ranking (features only, top 10), for reference.

Recall (R@1/5/10 both directions, mean recall) is computed from prediction files against the
split's gold ``texts.jsonl``. Models default to the trained ``demo_en`` ones under ``work/``; a
missing one is replaced by an untrained tiny model of its family, which keeps the cost numbers
valid but puts its recall at chance level (the JSON says which). Prints a JSON summary with the
ratios two-stage / exhaustive (seconds and pairs); ``--json`` writes the figures by name.
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

from vlretrieval.config import MODELS_SCHEMA, schema_default  # noqa: E402 (after the path)

from benchjson import write_figures  # noqa: E402

TOP_K = schema_default(MODELS_SCHEMA, "eval", "top_k")

SPLIT = "test"
NAME = "bench_rerank"
DEFAULT_VINVL = ROOT / "work" / "demo_en" / "vinvl" / "models" / "finetuned"
DEFAULT_CANDIDATES = ROOT / "work" / "demo_en" / "ernie_vil" / "models" / "finetuned"
REGION_FILES = {"features": "{split}_features.tsv", "predictions": "{split}_predictions.tsv"}


def _build_split(work: Path, images: int, captions: int, seed: int,
                 appearance_seed: int) -> tuple[Path, Path, float]:
    """Generate, extract and serialize the split and its regions; returns (split dir, regions dir, seconds)."""
    from vlretrieval.data.demo import DemoSpec, write_demo_archive
    from vlretrieval.data.download import safe_extract
    from vlretrieval.data.lmdb_store import serialize_split
    from vlretrieval.data.regions import serialize_split_regions

    started = time.perf_counter()
    spec = DemoSpec(name=NAME, seed=seed, sizes={SPLIT: images}, image_size=64, captions_per_image=captions,
                    caption_language="en", regions=True, appearance_seed=appearance_seed)
    write_demo_archive(spec, work / f"{NAME}.zip")
    safe_extract(work / f"{NAME}.zip", work / "download")
    split_dir, regions_dir = work / "lmdb" / SPLIT, work / "regions" / SPLIT
    serialize_split("raw_tsv", work / "download", SPLIT, split_dir, entry={"format": "raw_tsv", "root": NAME},
                    progress=False)
    serialize_split_regions(work / "download", {"root": NAME, "regions": REGION_FILES}, SPLIT, split_dir,
                            regions_dir)
    return split_dir, regions_dir, time.perf_counter() - started


def _model(requested: Path | None, default: Path, family: str, work: Path, split_dir: Path) -> tuple[Path, str]:
    """The model directory to use and how it was obtained ("given", "trained demo_en", "untrained tiny")."""
    from vlretrieval.models.prepare import prepare_initial_model, vocab_texts_from_split

    if requested is not None:
        if not requested.is_dir():
            raise SystemExit(f"{requested}: no such model directory")
        return requested, "given"
    if default.is_dir():
        return default, "trained demo_en"
    out = prepare_initial_model(family, "tiny", work / f"tiny_{family}", vocab_texts=vocab_texts_from_split(split_dir))
    return out, "untrained tiny"


def _recall(split_dir: Path, scorer, predictions_dir: Path) -> dict:
    from vlretrieval.retrieval.evaluate import GOLD_FILE, I2T_FILE, T2I_FILE
    from vlretrieval.retrieval.metrics import score_prediction_files

    scores = score_prediction_files(
        split_dir / GOLD_FILE, predictions_dir / T2I_FILE, predictions_dir / I2T_FILE, k=TOP_K,
        image_ids=[int(i) for i in scorer.image_ids], text_ids=[int(t) for t in scorer.text_ids],
        allow_extra_queries=True,
    )

    def rounded(value):
        return {k: rounded(v) for k, v in value.items()} if isinstance(value, dict) else round(value, 2)

    return rounded(scores)


def _write(scorer, t2i, i2t, out: Path, k: int = TOP_K) -> Path:
    """Prediction files of the best ``k`` of each ranking (the scorer wants exactly ``k`` ids a query)."""
    from vlretrieval.retrieval.evaluate import I2T_FILE, T2I_FILE
    from vlretrieval.retrieval.rerank import write_rankings

    out.mkdir(parents=True, exist_ok=True)
    write_rankings(scorer, t2i[:, :k], i2t[:, :k], out / T2I_FILE, out / I2T_FILE)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000, help="test images (1,000: the COCO 1K protocol)")
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--k", type=int, default=schema_default(MODELS_SCHEMA, "eval", "candidates", "k"),
                        help="two-stage candidates per query")
    parser.add_argument("--batch-size", type=int, default=schema_default(MODELS_SCHEMA, "eval", "pair_batch_size"),
                        help="pairs per cross-encoder forward pass")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU math-library threads (OMP/MKL/OpenBLAS; default: the libraries' own)")
    parser.add_argument("--seed", type=int, default=5, help="generator seed of the test split")
    parser.add_argument("--appearance-seed", type=int, default=None,
                        help="seed of the split's region appearance vectors (default: demo_en's generator seed, "
                             "so that the VinVL trained on demo_en reads them as its own detector's features)")
    parser.add_argument("--vinvl-model", type=Path, default=None,
                        help=f"VinVL model directory (default: {DEFAULT_VINVL.relative_to(ROOT)} if present)")
    parser.add_argument("--candidates-model", type=Path, default=None,
                        help=f"dual encoder for the candidates (default: {DEFAULT_CANDIDATES.relative_to(ROOT)} "
                             "if present)")
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default: a fresh temporary one)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here, by name")
    args = parser.parse_args(argv)
    if args.k < 10:
        parser.error("--k must be at least 10 (R@10 needs 10 candidates per query)")
    if args.k > args.images:
        parser.error(f"--k {args.k} exceeds the gallery of {args.images} images")
    if args.threads:
        # Read by the math libraries when paddle loads them, so set before the first import.
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[name] = str(args.threads)

    import numpy as np
    import paddle

    from vlretrieval.config import load_datasets
    from vlretrieval.retrieval.extract import IMAGES_DIR, TEXTS_DIR, extract_split
    from vlretrieval.models.vinvl import RegionPairScorer
    from vlretrieval.retrieval.rerank import candidate_positions, rank_exhaustive, rerank_candidates
    from vlretrieval.retrieval.evaluate import I2T_FILE, T2I_FILE
    from vlretrieval.retrieval.topk import rank_features

    appearance_seed = args.appearance_seed
    if appearance_seed is None:
        appearance_seed = int(load_datasets(ROOT / "config" / "datasets.yaml")["demo_en"]["generator"].get("seed", 0))
    paddle.set_device("cpu")
    with tempfile.TemporaryDirectory(prefix="bench_rerank.", dir=args.dir) as tmp:
        work = Path(tmp)
        split_dir, regions_dir, data_s = _build_split(work, args.images, args.captions_per_image, args.seed,
                                                      appearance_seed)
        vinvl_dir, vinvl_origin = _model(args.vinvl_model, DEFAULT_VINVL, "vinvl", work, split_dir)
        dual_dir, dual_origin = _model(args.candidates_model, DEFAULT_CANDIDATES, "ernie_vil", work, split_dir)

        started = time.perf_counter()
        scorer = RegionPairScorer(vinvl_dir, split_dir, regions_dir, batch_size=args.batch_size)
        setup_s = time.perf_counter() - started
        n_texts, n_images = len(scorer.text_ids), len(scorer.image_ids)
        # Warm-up (kernels, allocator) outside every timed section: one image against one batch.
        scorer.score(0, np.arange(min(n_texts, args.batch_size)))

        # First stage: dual-encoder features, then the exact top k of every query.
        features = work / "features"
        started = time.perf_counter()
        extract_split(dual_dir, split_dir, features, engine="dynamic", progress=False,
                      image_batch_size=schema_default(MODELS_SCHEMA, "eval", "image_batch_size"),
                      text_batch_size=schema_default(MODELS_SCHEMA, "eval", "text_batch_size"))
        extract_s = time.perf_counter() - started
        started = time.perf_counter()
        t2i_cands, i2t_cands = candidate_positions(features, scorer.text_ids, scorer.image_ids, args.k)
        candidates_s = time.perf_counter() - started

        # Dense reference: the dual encoder's own top 10.
        started = time.perf_counter()
        dense_dir = work / "pred" / "dense"
        dense_dir.mkdir(parents=True)
        rank_features(features / IMAGES_DIR, features / TEXTS_DIR, dense_dir / T2I_FILE, dense_dir / I2T_FILE, k=TOP_K,
                      chunk_size=schema_default(MODELS_SCHEMA, "eval", "chunk_size"))
        dense_rank_s = time.perf_counter() - started

        t2i, i2t, two_stats = rerank_candidates(scorer, t2i_cands, i2t_cands)
        two_dir = _write(scorer, t2i, i2t, work / "pred" / "two_stage")

        t2i, i2t, ex_stats = rank_exhaustive(scorer, 10)
        ex_dir = _write(scorer, t2i, i2t, work / "pred" / "exhaustive")

        recall_ex = _recall(split_dir, scorer, ex_dir)
        recall_two = _recall(split_dir, scorer, two_dir)
        recall_dense = _recall(split_dir, scorer, dense_dir)

    rate = ex_stats.pairs_scored / ex_stats.seconds
    two_total_s = extract_s + candidates_s + two_stats.seconds
    notes = []
    if vinvl_origin == "untrained tiny":
        notes.append("the VinVL model is untrained (no trained model found): exhaustive and two-stage recall "
                     "are chance level; the cost numbers are valid")
    if dual_origin == "untrained tiny":
        notes.append("the candidate dual encoder is untrained (no trained model found): dense recall is chance "
                     "level and the two-stage candidates are close to random, so two-stage recall is capped by how "
                     f"often the gold falls among {args.k} random candidates; the cost numbers are valid")
    result = {
        "benchmark": "cross-encoder retrieval: exhaustive vs two-stage re-ranking",
        "paddle": paddle.__version__,
        "threads": args.threads,
        "batch_size": args.batch_size,
        "split": {"images": n_images, "texts": n_texts, "seed": args.seed, "appearance_seed": appearance_seed,
                  "build_seconds": round(data_s, 2)},
        "models": {"vinvl": vinvl_origin, "candidates": dual_origin},
        "model_dirs": {
            "vinvl": str(vinvl_dir) if vinvl_origin != "untrained tiny" else None,
            "candidates": str(dual_dir) if dual_origin != "untrained tiny" else None,
        },
        "scorer_setup_seconds": round(setup_s, 3),
        "pairs_per_second": round(rate, 1),
        "exhaustive": {"pairs": ex_stats.pairs_scored, "seconds": round(ex_stats.seconds, 3), "recall": recall_ex},
        "two_stage": {
            "k": args.k,
            "pairs": two_stats.pairs_scored,
            "pairs_per_second": round(two_stats.pairs_scored / two_stats.seconds, 1),
            "seconds_rerank": round(two_stats.seconds, 3),
            "seconds_first_stage": {"extract": round(extract_s, 3), "candidates": round(candidates_s, 3)},
            "seconds_total": round(two_total_s, 3),
            "recall": recall_two,
        },
        "dense": {"seconds": round(extract_s + dense_rank_s, 3), "recall": recall_dense},
        "ratios": {
            "pairs_two_stage_over_exhaustive": round(two_stats.pairs_scored / ex_stats.pairs_scored, 5),
            "seconds_rerank_over_exhaustive": round(two_stats.seconds / ex_stats.seconds, 5),
            "seconds_total_over_exhaustive": round(two_total_s / ex_stats.seconds, 5),
            "mean_recall_two_stage_minus_exhaustive": round(recall_two["mean_recall"] - recall_ex["mean_recall"], 2),
        },
        "notes": notes,
    }
    print(json.dumps(result, indent=2))
    figures = {
        "pairs_per_second": rate,
        "exhaustive_s": ex_stats.seconds,
        "two_stage_rerank_s": two_stats.seconds,
        "two_stage_total_s": two_total_s,
        "dense_s": extract_s + dense_rank_s,
        **{name: value for name, value in result["ratios"].items()},
        "exhaustive_mean_recall": recall_ex["mean_recall"],
        "two_stage_mean_recall": recall_two["mean_recall"],
        "dense_mean_recall": recall_dense["mean_recall"],
    }
    write_figures(args.json, "bench_rerank", figures,
                  **{name: value for name, value in result.items() if name not in ("ratios", "benchmark")})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
