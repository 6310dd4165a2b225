"""Cross-encoder retrieval: every pair scored (exhaustive), or a dual encoder's top k re-ranked (two-stage).

A cross encoder scores an (image, text) pair jointly, so ranking a gallery means one forward pass
per pair. Two protocols, written to the same prediction files as dense ranking
(:mod:`vlretrieval.retrieval.predictions`):

* ``exhaustive``: every (text, image) pair of the split, the protocol of the papers' COCO 1K test
  (5,000 captions x 1,000 images = 5M passes). Exact, and affordable only on small test sets.
* ``two_stage``: a first stage gives each text its top ``k`` images and each image its top ``k``
  texts: a dual encoder's features (exact dot-product top-k), or the cross encoder's own contrastive
  head (``itc``: BridgeTower's ITC similarity, ``k_test``). The cross encoder scores the union of those
  pairs, once each, and re-orders every candidate list by its score. Gold items outside a query's
  ``k`` candidates are misses, so ``k`` bounds the recall the cross encoder can reach.

Scoring goes image by image (:class:`PairScorer`, made by the model's family: ``family.pair_scorer``):
the image's inputs are prepared once and scored against batches of texts, with progress logged.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from ..config import CROSS_ENCODER_PROTOCOLS as PROTOCOLS
from ..config import MODELS_SCHEMA, schema_default
from ..errors import ConfigError, DataError
from .features import load_any_features
from .predictions import IMAGE_TO_TEXT, TEXT_TO_IMAGE, write_predictions
from .topk import select_topk, topk_search

log = logging.getLogger(__name__)

EXHAUSTIVE, TWO_STAGE = PROTOCOLS
#: ``--candidates`` value naming the cross encoder's own contrastive head as the first stage.
OWN_ITC_HEAD = "itc"


class PairScorer(Protocol):
    """Scores pairs of one split: ``text_ids``/``image_ids`` in split order, addressed by position."""

    text_ids: np.ndarray
    image_ids: np.ndarray

    def score(self, image_index: int, text_indices: np.ndarray) -> np.ndarray:
        """Scores (float32, higher = better match) of image ``image_index`` with each text in ``text_indices``."""
        ...


@dataclass
class RankingStats:
    """What a cross-encoder ranking cost."""

    protocol: str
    pairs_scored: int
    seconds: float  # scoring pairs with the cross encoder
    candidates_k: int | None = None
    first_stage_seconds: float | None = None  # two_stage: finding the candidates

    def as_dict(self) -> dict[str, Any]:
        rate = self.pairs_scored / self.seconds if self.seconds > 0 else None
        return {"protocol": self.protocol, "pairs_scored": self.pairs_scored, "seconds": round(self.seconds, 3),
                "pairs_per_second": round(rate, 1) if rate else None, "candidates_k": self.candidates_k,
                "first_stage_seconds": None if self.first_stage_seconds is None else round(self.first_stage_seconds, 3)}


class _Progress:
    def __init__(self, total_pairs: int, what: str, interval: float = 10.0):
        self.total, self.what, self.interval = total_pairs, what, interval
        self.done = 0
        self.started = self.last = time.perf_counter()

    def advance(self, pairs: int) -> None:
        self.done += pairs
        now = time.perf_counter()
        if now - self.last >= self.interval or self.done == self.total:
            self.last = now
            rate = self.done / max(now - self.started, 1e-9)
            log.info("%s: %d/%d pairs scored (%.0f pairs/s, %.0fs left)", self.what, self.done, self.total,
                     rate, (self.total - self.done) / rate if rate else float("nan"))


def exhaustive_scores(scorer: PairScorer) -> tuple[np.ndarray, RankingStats]:
    """The ``[n_texts, n_images]`` score matrix of every pair of the split."""
    n_texts, n_images = len(scorer.text_ids), len(scorer.image_ids)
    scores = np.empty((n_texts, n_images), dtype=np.float32)
    all_texts = np.arange(n_texts)
    progress = _Progress(n_texts * n_images, "exhaustive")
    for image_index in range(n_images):
        scores[:, image_index] = scorer.score(image_index, all_texts)
        progress.advance(n_texts)
    if not np.isfinite(scores).all():
        raise DataError("exhaustive scoring", "the cross encoder produced non-finite scores")
    return scores, RankingStats(EXHAUSTIVE, n_texts * n_images, time.perf_counter() - progress.started)


def rank_exhaustive(scorer: PairScorer, top_k: int) -> tuple[np.ndarray, np.ndarray, RankingStats]:
    """Top ``top_k`` image ids of every text and text ids of every image, from every pair's score."""
    scores, stats = exhaustive_scores(scorer)
    t2i, _ = select_topk(scores, min(top_k, scores.shape[1]))
    i2t, _ = select_topk(np.ascontiguousarray(scores.T), min(top_k, scores.shape[0]))
    return scorer.image_ids[t2i], scorer.text_ids[i2t], stats


def candidate_positions(features_dir: str | os.PathLike, text_ids: np.ndarray, image_ids: np.ndarray,
                        k: int) -> tuple[np.ndarray, np.ndarray]:
    """A dual encoder's exact top ``k``: image positions per text ``[n_texts, k]`` and text positions
    per image ``[n_images, k]``, positions in the order of ``text_ids`` / ``image_ids``."""
    features_dir = Path(features_dir)
    images = load_any_features(features_dir / "images", "image")
    texts = load_any_features(features_dir / "texts", "text")
    for name, fs, expected in (("image", images, image_ids), ("text", texts, text_ids)):
        if set(map(int, fs.ids)) != set(map(int, expected)):
            missing = sorted(set(map(int, expected)) - set(map(int, fs.ids)))[:5]
            extra = sorted(set(map(int, fs.ids)) - set(map(int, expected)))[:5]
            raise DataError(str(features_dir), f"candidate {name} features are not of the evaluated split "
                                               f"(missing ids {missing}, unknown ids {extra})")
    if k > min(len(images), len(texts)):
        raise ConfigError(f"candidates k={k} exceeds the gallery ({len(images)} images, {len(texts)} texts)")
    image_position = {int(i): p for p, i in enumerate(image_ids)}
    text_position = {int(t): p for p, t in enumerate(text_ids)}
    t2i = np.empty((len(text_ids), k), dtype=np.int64)
    i2t = np.empty((len(image_ids), k), dtype=np.int64)
    for queries, gallery, out, query_position, gallery_position in (
        (texts, images, t2i, text_position, image_position),
        (images, texts, i2t, image_position, text_position),
    ):
        query_ids, top_ids, _ = topk_search(queries, gallery, k)
        rows = np.fromiter((query_position[int(q)] for q in query_ids), dtype=np.int64, count=len(query_ids))
        out[rows] = np.vectorize(lambda i: gallery_position[int(i)], otypes=[np.int64])(top_ids)
    return t2i, i2t


def itc_candidate_positions(scorer: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    """A cross encoder's own first stage: the exact top ``k`` of the similarities of its contrastive
    head (``scorer.itc_features()``), as image positions per text ``[n_texts, k]`` and text positions
    per image ``[n_images, k]``, best first, ties by position."""
    texts, images = scorer.itc_features()
    if not 1 <= k <= min(len(texts), len(images)):
        raise ConfigError(f"candidates k={k} must be between 1 and the gallery ({len(images)} images, "
                          f"{len(texts)} texts)")
    similarity = texts @ images.T
    t2i, _ = select_topk(similarity, k)
    i2t, _ = select_topk(np.ascontiguousarray(similarity.T), k)
    return t2i, i2t


def rerank_candidates(scorer: PairScorer, t2i_candidates: np.ndarray, i2t_candidates: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray, RankingStats]:
    """Re-order every candidate list by the cross encoder's score; each distinct pair is scored once.

    Ties keep the first stage's order. Returns image ids per text and text ids per image.
    """
    n_images = len(scorer.image_ids)
    keys = np.concatenate([
        (np.arange(len(t2i_candidates))[:, None] * n_images + t2i_candidates).ravel(),
        (i2t_candidates * n_images + np.arange(n_images)[:, None]).ravel(),
    ])
    keys = np.unique(keys)
    texts_of_pair, images_of_pair = np.divmod(keys, n_images)
    pair_scores = np.empty(len(keys), dtype=np.float32)
    progress = _Progress(len(keys), "two-stage re-ranking")
    order = np.argsort(images_of_pair, kind="stable")
    bounds = np.flatnonzero(np.diff(images_of_pair[order])) + 1
    for group in np.split(order, bounds):
        if len(group):
            pair_scores[group] = scorer.score(int(images_of_pair[group[0]]), texts_of_pair[group])
            progress.advance(len(group))
    if not np.isfinite(pair_scores).all():
        raise DataError("two-stage re-ranking", "the cross encoder produced non-finite scores")

    def lookup(text_positions: np.ndarray, image_positions: np.ndarray) -> np.ndarray:
        return pair_scores[np.searchsorted(keys, text_positions * n_images + image_positions)]

    def reorder(candidates: np.ndarray, scores: np.ndarray) -> np.ndarray:
        # Candidates arrive in first-stage order, so a stable sort leaves ties in that order.
        return np.take_along_axis(candidates, np.argsort(-scores, axis=1, kind="stable"), axis=1)

    t2i_scores = lookup(np.arange(len(t2i_candidates))[:, None], t2i_candidates)
    i2t_scores = lookup(i2t_candidates, np.arange(n_images)[:, None])
    t2i = reorder(t2i_candidates, t2i_scores)
    i2t = reorder(i2t_candidates, i2t_scores)
    stats = RankingStats(TWO_STAGE, len(keys), time.perf_counter() - progress.started, t2i_candidates.shape[1])
    return scorer.image_ids[t2i], scorer.text_ids[i2t], stats


def write_rankings(scorer: PairScorer, t2i_ids: np.ndarray, i2t_ids: np.ndarray,
                   out_t2i: str | os.PathLike, out_i2t: str | os.PathLike) -> None:
    write_predictions(out_t2i, TEXT_TO_IMAGE, scorer.text_ids, t2i_ids)
    write_predictions(out_i2t, IMAGE_TO_TEXT, scorer.image_ids, i2t_ids)


def check_protocol(protocol: str, candidates: str | os.PathLike | None, k: int | None, top_k: int) -> None:
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown cross-encoder protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
    if protocol == TWO_STAGE:
        if candidates is None or k is None:
            raise ConfigError("two-stage re-ranking needs candidate features and a candidate count k")
        if k < top_k:
            raise ConfigError(f"candidates k={k} is below top_k={top_k}: R@{top_k} would be cut off")


def rank_with_cross_encoder(
    model_dir: str | os.PathLike,
    split_dir: str | os.PathLike,
    out_t2i: str | os.PathLike,
    out_i2t: str | os.PathLike,
    *,
    protocol: str,
    top_k: int,
    candidates: str | os.PathLike | None = None,
    candidates_k: int | None = None,
    regions: str | os.PathLike | None = None,
    batch_size: int,
    max_len: int | None = None,
) -> RankingStats:
    """Rank the split ``split_dir`` with the cross encoder in ``model_dir`` and write both prediction files."""
    from ..models.base import model_dir_family
    from ..models.registry import CROSS_ENCODER

    check_protocol(protocol, candidates, candidates_k, top_k)
    family = model_dir_family(model_dir)
    if family.kind != CROSS_ENCODER:
        raise ConfigError(f"{model_dir}: {family.name} is a {family.kind}; rank its features instead")
    scorer = family.pair_scorer(model_dir, split_dir, regions=regions, batch_size=batch_size, max_len=max_len)
    try:
        return _rank(scorer, family, out_t2i, out_i2t, protocol, top_k, candidates, candidates_k)
    finally:
        getattr(scorer, "close", lambda: None)()


def _rank(scorer: PairScorer, family: Any, out_t2i: str | os.PathLike, out_i2t: str | os.PathLike, protocol: str,
          top_k: int, candidates: str | os.PathLike | None, candidates_k: int | None) -> RankingStats:
    if protocol == EXHAUSTIVE:
        t2i, i2t, stats = rank_exhaustive(scorer, top_k)
    else:
        started = time.perf_counter()
        if os.fspath(candidates) == OWN_ITC_HEAD:
            if not hasattr(scorer, "itc_features"):
                raise ConfigError(f"{family.name} has no contrastive head to give candidates; name a dual encoder")
            t2i_candidates, i2t_candidates = itc_candidate_positions(scorer, int(candidates_k))
        else:
            t2i_candidates, i2t_candidates = candidate_positions(candidates, scorer.text_ids, scorer.image_ids,
                                                                 int(candidates_k))
        first_stage_seconds = time.perf_counter() - started
        t2i, i2t, stats = rerank_candidates(scorer, t2i_candidates, i2t_candidates)
        stats.first_stage_seconds = first_stage_seconds
        # The prediction files hold exactly top_k ids per query, as dense ranking writes them.
        t2i, i2t = t2i[:, :top_k], i2t[:, :top_k]
    write_rankings(scorer, t2i, i2t, out_t2i, out_i2t)
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlretrieval.retrieval.rerank", description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True, help="a saved cross-encoder model directory")
    parser.add_argument("--split-dir", type=Path, required=True, help="the serialized evaluation split")
    parser.add_argument("--regions", type=Path, default=None, help="the split's region store (region families)")
    parser.add_argument("--protocol", choices=PROTOCOLS, required=True)
    parser.add_argument("--candidates", default=None,
                        help=f"two_stage: a dual encoder's features directory, or '{OWN_ITC_HEAD}' for the model's own contrastive head")
    parser.add_argument("--candidates-k", type=int, default=None, help="two_stage: candidates per query")
    parser.add_argument("--top-k", type=int, default=schema_default(MODELS_SCHEMA, "eval", "top_k"),
                        help="predictions per query (default: eval.top_k of the model schema)")
    parser.add_argument("--batch-size", type=int, default=schema_default(MODELS_SCHEMA, "eval", "pair_batch_size"),
                        help="pairs per forward pass (default: eval.pair_batch_size of the model schema)")
    parser.add_argument("--max-len", type=int, default=None, help="text tokens per pair (default: the model's)")
    parser.add_argument("--out-t2i", type=Path, required=True)
    parser.add_argument("--out-i2t", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    stats = rank_with_cross_encoder(
        args.model_dir, args.split_dir, args.out_t2i, args.out_i2t, protocol=args.protocol, top_k=args.top_k,
        candidates=args.candidates, candidates_k=args.candidates_k, regions=args.regions,
        batch_size=args.batch_size, max_len=args.max_len,
    )
    print(json.dumps({"ranking": stats.as_dict()}))
    return 0


if __name__ == "__main__":
    from vlretrieval.cli import run

    raise SystemExit(run(main))
