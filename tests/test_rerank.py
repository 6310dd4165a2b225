"""Cross-encoder ranking protocols: exhaustive scoring and two-stage re-ranking of dual-encoder candidates.

The protocol logic is checked against a scorer that reads a fixed score matrix, so every expected
ranking can be computed independently with argsort; the VinVL scorer itself runs in the VinVL tests
and the end-to-end workflow test.
"""

from __future__ import annotations

import numpy as np
import pytest

from vlretrieval.config import evaluation_protocol
from vlretrieval.errors import ConfigError, DataError
from vlretrieval.retrieval.features import FeatureSet, l2_normalize, save_features
from vlretrieval.retrieval.predictions import read_predictions
from vlretrieval.retrieval.rerank import (
    candidate_positions,
    check_protocol,
    rank_exhaustive,
    rerank_candidates,
    write_rankings,
)


class MatrixScorer:
    """Scores from a known ``[n_texts, n_images]`` matrix; counts every pair it is asked for."""

    def __init__(self, scores: np.ndarray, text_ids, image_ids):
        self.scores = scores.astype(np.float32)
        self.text_ids = np.asarray(text_ids, dtype=np.int64)
        self.image_ids = np.asarray(image_ids, dtype=np.int64)
        self.requested: list[tuple[int, int]] = []

    def score(self, image_index, text_indices):
        self.requested += [(int(t), int(image_index)) for t in text_indices]
        return self.scores[np.asarray(text_indices), image_index]


@pytest.fixture
def scorer():
    rng = np.random.default_rng(0)
    return MatrixScorer(rng.normal(size=(40, 12)), text_ids=np.arange(100, 140), image_ids=np.arange(7, 19))


def test_exhaustive_ranks_every_pair_like_argsort(scorer):
    t2i, i2t, stats = rank_exhaustive(scorer, top_k=10)
    expected_t2i = scorer.image_ids[np.argsort(-scorer.scores, axis=1, kind="stable")[:, :10]]
    expected_i2t = scorer.text_ids[np.argsort(-scorer.scores.T, axis=1, kind="stable")[:, :10]]
    np.testing.assert_array_equal(t2i, expected_t2i)
    np.testing.assert_array_equal(i2t, expected_i2t)
    assert stats.pairs_scored == 40 * 12 == len(set(scorer.requested)) == len(scorer.requested)


def test_two_stage_scores_each_candidate_pair_once_and_reorders_by_score(scorer):
    rng = np.random.default_rng(1)
    t2i_cands = np.stack([rng.permutation(12)[:5] for _ in range(40)])
    i2t_cands = np.stack([rng.permutation(40)[:6] for _ in range(12)])
    t2i, i2t, stats = rerank_candidates(scorer, t2i_cands, i2t_cands)

    wanted = {(t, int(i)) for t in range(40) for i in t2i_cands[t]} | {(int(t), i) for i in range(12) for t in i2t_cands[i]}
    assert len(scorer.requested) == len(set(scorer.requested)) == len(wanted) == stats.pairs_scored
    assert set(scorer.requested) == wanted
    assert stats.candidates_k == 5
    for t in range(40):
        cands = t2i_cands[t]
        expected = cands[np.argsort(-scorer.scores[t, cands], kind="stable")]
        np.testing.assert_array_equal(t2i[t], scorer.image_ids[expected])
    for i in range(12):
        cands = i2t_cands[i]
        expected = cands[np.argsort(-scorer.scores[cands, i], kind="stable")]
        np.testing.assert_array_equal(i2t[i], scorer.text_ids[expected])


def test_two_stage_ties_keep_the_first_stage_order():
    scores = np.zeros((3, 4), dtype=np.float32)
    scores[0, 2] = 1.0
    scorer = MatrixScorer(scores, [10, 11, 12], [0, 1, 2, 3])
    t2i, _, _ = rerank_candidates(scorer, np.array([[3, 1, 2, 0]] * 3), np.array([[2, 0, 1]] * 4))
    assert t2i[0].tolist() == [2, 3, 1, 0]  # the one higher score first, the rest as the first stage had them
    assert t2i[1].tolist() == [3, 1, 2, 0]


def test_candidates_come_from_the_dual_encoders_exact_topk(tmp_path):
    rng = np.random.default_rng(2)
    image_ids, text_ids = np.arange(50, 62), np.arange(200, 236)
    images = l2_normalize(rng.normal(size=(12, 8)).astype(np.float32))
    texts = l2_normalize(rng.normal(size=(36, 8)).astype(np.float32))
    # Stored in another order than the split's, as extraction may write them.
    image_order, text_order = rng.permutation(12), rng.permutation(36)
    save_features(tmp_path / "feats" / "images", FeatureSet(image_ids[image_order], images[image_order]))
    save_features(tmp_path / "feats" / "texts", FeatureSet(text_ids[text_order], texts[text_order]))

    t2i, i2t = candidate_positions(tmp_path / "feats", text_ids, image_ids, k=10)
    similarity = texts @ images.T
    np.testing.assert_array_equal(t2i, np.argsort(-similarity, axis=1, kind="stable")[:, :10])
    np.testing.assert_array_equal(i2t, np.argsort(-similarity.T, axis=1, kind="stable")[:, :10])

    with pytest.raises(DataError, match="not of the evaluated split"):
        candidate_positions(tmp_path / "feats", text_ids, np.arange(12), k=10)
    with pytest.raises(ConfigError, match="exceeds the gallery"):
        candidate_positions(tmp_path / "feats", text_ids, image_ids, k=13)


def test_rankings_are_written_in_the_prediction_format(tmp_path, scorer):
    t2i, i2t, _ = rank_exhaustive(scorer, top_k=10)
    write_rankings(scorer, t2i, i2t, tmp_path / "t2i.jsonl", tmp_path / "i2t.jsonl")
    t2i_read = read_predictions(tmp_path / "t2i.jsonl", "t2i")
    assert t2i_read[100] == t2i[0].tolist()
    assert read_predictions(tmp_path / "i2t.jsonl", "i2t")[18] == i2t[11].tolist()


def test_protocol_checks():
    check_protocol("exhaustive", None, None, 10)
    with pytest.raises(ConfigError, match="unknown"):
        check_protocol("sampled", None, None, 10)
    with pytest.raises(ConfigError, match="needs candidate"):
        check_protocol("two_stage", None, 20, 10)
    with pytest.raises(ConfigError, match="below top_k"):
        check_protocol("two_stage", "feats", 5, 10)


def test_evaluation_protocol_is_recorded_per_kind():
    models = {"ernie_vil": {"family": "ernie_vil"}, "vinvl": {"family": "vinvl"}}
    stages = ["zeroshot", "finetuned"]
    dense = evaluation_protocol({"eval": {"top_k": 10}}, "dual_encoder", stages)
    assert dense["name"] == "dense" and dense["top_k"] == 10
    assert evaluation_protocol({"eval": {}}, "cross_encoder", stages)["name"] == "exhaustive"
    two = evaluation_protocol({"eval": {"protocol": "two_stage", "candidates": {"model": "ernie_vil"}}},
                              "cross_encoder", stages, models)
    assert two["candidates"] == {"model": "ernie_vil", "stage": "finetuned", "k": 20}
    with pytest.raises(ConfigError, match="not a dual encoder"):
        evaluation_protocol({"eval": {"protocol": "two_stage", "candidates": {"model": "vinvl"}}},
                            "cross_encoder", stages, models)
    # A dataset without a train split has only zero-shot features to offer.
    zeroshot_only = evaluation_protocol({"eval": {"protocol": "two_stage", "candidates": {"model": "ernie_vil"}}},
                                        "cross_encoder", ["zeroshot"], models)
    assert zeroshot_only["candidates"]["stage"] == "zeroshot"
    with pytest.raises(ConfigError, match="not evaluated"):
        evaluation_protocol({"eval": {"protocol": "two_stage", "candidates": {"model": "ernie_vil", "stage": "finetuned"}}},
                            "cross_encoder", ["zeroshot"], models)
    own = evaluation_protocol({"eval": {"protocol": "two_stage", "candidates": {"head": "itc", "k": 16}}},
                              "cross_encoder", stages, models)
    assert own["candidates"] == {"head": "itc", "k": 16}
    with pytest.raises(ConfigError, match="either"):
        evaluation_protocol({"eval": {"protocol": "two_stage", "candidates": {"head": "itc", "model": "ernie_vil"}}},
                            "cross_encoder", stages, models)


def test_a_pair_override_replaces_the_first_stage_and_region_models_need_regions():
    from vlretrieval.config import pair_config, required_extra_inputs

    models = {"bridgetower": {"family": "bridgetower", "init": "tiny", "eval": {"candidates": {"head": "itc", "k": 128}}},
              "vinvl": {"family": "vinvl", "init": "tiny", "eval": {}}}
    config = {"pair_overrides": {"d": {"bridgetower": {"eval": {"candidates": {"model": "ernie_vil", "k": 20}}}}}}
    assert pair_config(config, models, "d", "bridgetower")["eval"]["candidates"] == {"model": "ernie_vil", "k": 20}
    assert required_extra_inputs({"regions": {}}, models["vinvl"], "d", "vinvl") == ("regions",)
    assert required_extra_inputs({}, models["bridgetower"], "d", "bridgetower") == ()
    with pytest.raises(ConfigError, match="no regions block"):
        required_extra_inputs({}, models["vinvl"], "demo_cn", "vinvl")
