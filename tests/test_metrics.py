"""Recall with the reference semantics, prediction files and their validation, gold files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vlretrieval.errors import DataError
from vlretrieval.retrieval.metrics import (
    direction_scores,
    first_hit_ranks,
    recall_at_k,
    recall_curve,
    score_directions,
    score_prediction_files,
)
from vlretrieval.retrieval.predictions import (
    IMAGE_TO_TEXT,
    TEXT_TO_IMAGE,
    invert_gold,
    read_gold_i2t,
    read_gold_t2i,
    read_predictions,
    tr_gold_path,
    validate_predictions,
    write_predictions,
    write_tr_gold,
)


def brute_force_recall(predictions, gold, k):
    """The reference evaluation loop, verbatim in spirit: any gold item among the first k."""
    hits = sum(1 for q, items in gold.items() if any(item in predictions[q][:k] for item in items))
    return hits * 1.0 / len(gold) * 100


def random_case(seed, n_queries=200, n_gallery=60, k=10):
    rng = np.random.default_rng(seed)
    gold = {
        int(q): {int(i) for i in rng.choice(n_gallery, size=int(rng.integers(1, 4)), replace=False)}
        for q in rng.permutation(n_queries) + 1000
    }
    predictions = {q: rng.permutation(n_gallery)[:k].tolist() for q in gold}
    return predictions, gold


def pad_to_ten(predictions):
    """Fill lists up to the ten ids R@10 needs with ids no gold contains."""
    return {q: ids + [-1 - n for n in range(10 - len(ids))] for q, ids in predictions.items()}


# ---------------------------------------------------------------------------------------------
# recall


def test_hand_computed_example():
    gold = {1: {10}, 2: {20, 21}, 3: {30}}
    predictions = {
        1: [10, 11, 12, 13, 14, 15, 16, 17, 18, 19],  # hit at rank 1
        2: [11, 12, 13, 21, 14, 15, 16, 17, 18, 19],  # hit at rank 4 (second gold item)
        3: [11, 12, 13, 14, 15, 16, 17, 18, 19, 10],  # miss
    }
    scores = recall_at_k(predictions, gold)
    assert list(scores) == ["r1", "r5", "r10"]
    assert scores["r1"] == pytest.approx(33.333333333333, abs=1e-9)
    assert scores["r5"] == pytest.approx(66.666666666667, abs=1e-9)
    assert scores["r10"] == pytest.approx(66.666666666667, abs=1e-9)
    assert recall_curve(predictions, gold) == pytest.approx([100 / 3] * 3 + [200 / 3] * 7)
    assert first_hit_ranks(predictions, gold, 10).tolist() == [0, 3, 10]
    direction = direction_scores(predictions, gold)
    assert direction["mean_recall"] == pytest.approx((100 / 3 + 200 / 3 + 200 / 3) / 3)
    # Not rounded: the exact fractions survive.
    assert direction["mean_recall"] != round(direction["mean_recall"], 2)


@pytest.mark.parametrize("seed", range(5))
def test_recall_matches_brute_force(seed):
    predictions, gold = random_case(seed)
    scores = recall_at_k(predictions, gold, ks=(1, 2, 5, 10))
    for k in (1, 2, 5, 10):
        assert scores[f"r{k}"] == pytest.approx(brute_force_recall(predictions, gold, k), abs=1e-12)
    curve = recall_curve(predictions, gold, max_k=10)
    assert curve == pytest.approx([brute_force_recall(predictions, gold, k) for k in range(1, 11)], abs=1e-12)
    assert all(a <= b for a, b in zip(curve, curve[1:]))


def test_direction_scores_equal_the_reference_arithmetic_bit_for_bit():
    predictions, gold = random_case(7, n_queries=37)
    stats = [sum(any(i in predictions[q][:k] for i in gold[q]) for q in gold) for k in (1, 5, 10)]
    r1, r5, r10 = (s * 1.0 / len(gold) for s in stats)
    scores = direction_scores(predictions, gold)
    assert scores == {"r1": r1 * 100, "r5": r5 * 100, "r10": r10 * 100, "mean_recall": (r1 + r5 + r10) / 3.0 * 100}


def test_extra_predictions_do_not_count():
    predictions, gold = random_case(1)
    with_extra = {**predictions, 999_999: [1] * 10}
    assert recall_at_k(with_extra, gold) == recall_at_k(predictions, gold)


def test_missing_or_short_predictions_are_errors():
    gold = {1: {10}, 2: {20}}
    with pytest.raises(DataError, match=r"query 2\): no prediction"):
        recall_at_k({1: list(range(10))}, gold)
    with pytest.raises(DataError, match=r"query 2\): 3 predicted ids, recall@10 needs at least 10"):
        recall_at_k({1: list(range(10)), 2: [1, 2, 3]}, gold)
    assert recall_at_k({1: [10, 2, 3], 2: [1, 2, 3]}, gold, ks=(1, 3)) == {"r1": 50.0, "r3": 50.0}
    with pytest.raises(DataError, match="no gold queries"):
        recall_at_k({}, {})
    with pytest.raises(ValueError, match="positive integer"):
        recall_at_k({1: [10]}, {1: {10}}, ks=(0,))


def test_score_directions_uses_inverted_gold():
    gold_t2i = {100: {1}, 101: {1}, 102: {2}, 103: {3}}
    t2i = {100: [1, 2, 3], 101: [2, 1, 3], 102: [3, 1, 2], 103: [3, 2, 1]}
    # image 1 has texts {100, 101}: hit at rank 1; image 2 {102}: rank 3; image 3 {103}: miss in top 3.
    i2t = {1: [101, 102, 103], 2: [100, 101, 102], 3: [100, 101, 102]}
    result = score_directions(pad_to_ten(t2i), pad_to_ten(i2t), gold_t2i)
    assert set(result) == {TEXT_TO_IMAGE, IMAGE_TO_TEXT, "mean_recall"}
    assert result[TEXT_TO_IMAGE]["r1"] == pytest.approx(50.0)  # texts 100 and 103
    assert result[TEXT_TO_IMAGE]["r5"] == pytest.approx(100.0)
    assert result[IMAGE_TO_TEXT]["r1"] == pytest.approx(100 / 3)
    assert result[IMAGE_TO_TEXT]["r5"] == pytest.approx(200 / 3)
    assert result["mean_recall"] == pytest.approx(
        (result[TEXT_TO_IMAGE]["mean_recall"] + result[IMAGE_TO_TEXT]["mean_recall"]) / 2)


# ---------------------------------------------------------------------------------------------
# gold files


@pytest.fixture
def texts_jsonl(tmp_path):
    path = tmp_path / "test_texts.jsonl"
    rows = [
        {"text_id": 5, "text": "一只猫", "image_ids": [30, 10]},
        {"text_id": 6, "text": "两只狗", "image_ids": [20]},
        {"text_id": 7, "text": "猫和狗", "image_ids": [10, 20]},
    ]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_gold_round_trip(tmp_path, texts_jsonl):
    gold = read_gold_t2i(texts_jsonl)
    assert gold == {5: {10, 30}, 6: {20}, 7: {10, 20}}
    assert invert_gold(gold) == {10: {5, 7}, 30: {5}, 20: {6, 7}}
    assert list(invert_gold(gold)) == [10, 30, 20]  # order of first mention
    out = tr_gold_path(texts_jsonl)
    assert out == str(tmp_path / "test_texts.tr.jsonl")
    write_tr_gold(out, gold)
    lines = [json.loads(line) for line in open(out, encoding="utf-8")]
    assert lines == [{"image_id": 10, "text_ids": [5, 7]}, {"image_id": 30, "text_ids": [5]},
                     {"image_id": 20, "text_ids": [6, 7]}]
    assert read_gold_i2t(out) == invert_gold(gold)


@pytest.mark.parametrize("line,problem", [
    ('{"text_id": 8, "text": "x", "image_ids": []}', "image_ids must be a non-empty list"),
    ('{"text_id": 8, "text": "x", "image_ids": [1.5]}', r"image_ids\[0\] must be an integer"),
    ('{"text_id": 5, "text": "x", "image_ids": [1]}', "duplicate text_id, first seen on line 1"),
    ('{"text_id": "8", "text": "x", "image_ids": [1]}', "text_id must be an integer"),
    ('[1, 2]', "expected a JSON object"),
])
def test_gold_errors(tmp_path, line, problem):
    path = tmp_path / "test_texts.jsonl"
    path.write_text('{"text_id": 5, "text": "x", "image_ids": [1]}\n' + line + "\n")
    with pytest.raises(DataError, match=problem) as err:
        read_gold_t2i(path)
    assert str(err.value).startswith(f"{path}:2")


# ---------------------------------------------------------------------------------------------
# prediction files


def test_write_read_predictions_in_reference_format(tmp_path):
    path = tmp_path / "t2i.jsonl"
    write_predictions(path, TEXT_TO_IMAGE, np.array([7, 3]), np.array([[1, 2, 3], [3, 2, 1]]))
    assert path.read_text() == ('{"text_id": 7, "image_ids": [1, 2, 3]}\n'
                                '{"text_id": 3, "image_ids": [3, 2, 1]}\n')
    assert read_predictions(path, "t2i", k=3) == {7: [1, 2, 3], 3: [3, 2, 1]}
    write_predictions(tmp_path / "i2t.jsonl", IMAGE_TO_TEXT, [1], [[9, 8]])
    assert (tmp_path / "i2t.jsonl").read_text() == '{"image_id": 1, "text_ids": [9, 8]}\n'
    assert read_predictions(tmp_path / "i2t.jsonl", IMAGE_TO_TEXT) == {1: [9, 8]}


def test_write_predictions_refuses_what_the_reference_rejects(tmp_path):
    path = tmp_path / "t2i.jsonl"
    with pytest.raises(ValueError, match="duplicates"):
        write_predictions(path, TEXT_TO_IMAGE, [1, 1], [[1, 2], [1, 2]])
    with pytest.raises(ValueError, match="text_id=2 contain a repeated id"):
        write_predictions(path, TEXT_TO_IMAGE, [1, 2], [[1, 2], [3, 3]])
    with pytest.raises(ValueError, match="2-D integer"):
        write_predictions(path, TEXT_TO_IMAGE, [1], [[1.0, 2.0]])
    with pytest.raises(ValueError, match="unknown direction"):
        write_predictions(path, "sideways", [1], [[1, 2]])
    assert not path.exists()


GOLD = {1: {10}, 2: {20}, 3: {30}}
GOOD_LINES = [
    '{"text_id": 1, "image_ids": [10, 20, 30]}',
    '{"text_id": 2, "image_ids": [20, 10, 30]}',
    '{"text_id": 3, "image_ids": [30, 20, 10]}',
]


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_validate_accepts_good_file(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", GOOD_LINES)
    predictions = validate_predictions(path, TEXT_TO_IMAGE, GOLD, k=3, gallery_ids=np.array([10, 20, 30]))
    assert predictions == {1: [10, 20, 30], 2: [20, 10, 30], 3: [30, 20, 10]}
    assert recall_at_k(predictions, GOLD, ks=(1,)) == {"r1": 100.0}


@pytest.mark.parametrize("line_no,replacement,problem", [
    (2, '{"text_id": 2, "image_ids": [20, 10]}', "expected 3 image_ids, found 2"),
    (2, '{"text_id": 2, "image_ids": [20, 10, 20]}', "image_ids repeat id 20"),
    (2, '{"text_id": 2, "image_ids": [20, 10.0, 30]}', r"image_ids\[1\] must be an integer, found 10.0 \(float\)"),
    (2, '{"text_id": 2, "image_ids": [20, "10", 30]}', r"image_ids\[1\] must be an integer, found \"10\" \(str\)"),
    (2, '{"text_id": 2, "image_ids": [20, true, 30]}', r"image_ids\[1\] must be an integer, found true \(bool\)"),
    (2, '{"text_id": 2, "image_ids": [20, 10, 99]}', r"image_ids\[2\]=99 is not in the gallery"),
    (2, '{"text_id": 4, "image_ids": [20, 10, 30]}', "text_id 4 is not a query of the gold annotations"),
    (2, '{"text_id": 1, "image_ids": [20, 10, 30]}', "duplicate text_id, first predicted on line 1"),
    (2, '{"text_id": true, "image_ids": [20, 10, 30]}', r"text_id must be an integer, found true \(bool\)"),
    (2, '{"text_id": 2.0, "image_ids": [20, 10, 30]}', "text_id must be an integer"),
    (2, '{"text_id": 2, "image_ids": 10}', "image_ids must be a list"),
    (2, '{"text_id": 2}', "missing image_ids"),
    (2, '{"image_id": 2, "text_ids": [20, 10, 30]}', "missing text_id"),
    (2, '{"text_id": 2, "image_ids": [20, 10, 30]', "invalid JSON"),
    (2, "", "blank line"),
])
def test_validation_errors_name_file_line_and_problem(tmp_path, line_no, replacement, problem):
    lines = list(GOOD_LINES)
    lines[line_no - 1] = replacement
    path = write_lines(tmp_path / "p.jsonl", lines)
    with pytest.raises(DataError, match=problem) as err:
        validate_predictions(path, TEXT_TO_IMAGE, GOLD, k=3, gallery_ids=[10, 20, 30])
    assert str(err.value).startswith(f"{path}:{line_no}")


def test_validation_error_names_the_query(tmp_path):
    lines = list(GOOD_LINES)
    lines[2] = '{"text_id": 3, "image_ids": [30, 30, 10]}'
    with pytest.raises(DataError) as err:
        validate_predictions(write_lines(tmp_path / "p.jsonl", lines), TEXT_TO_IMAGE, GOLD, k=3)
    assert err.value.location.endswith("p.jsonl:3") and err.value.record == "text_id=3"


def test_missing_query_is_reported_with_its_id(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", GOOD_LINES[:2])
    with pytest.raises(DataError) as err:
        validate_predictions(path, TEXT_TO_IMAGE, GOLD, k=3)
    message = str(err.value)
    assert message.startswith(str(path)) and "text_id=3" in message
    assert "no prediction line for 1 of 3 gold queries" in message


def test_extra_queries_can_be_allowed(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", GOOD_LINES + ['{"text_id": 4, "image_ids": [20, 10, 30]}'])
    with pytest.raises(DataError, match=":4 .*not a query of the gold"):
        validate_predictions(path, TEXT_TO_IMAGE, GOLD, k=3)
    assert len(validate_predictions(path, TEXT_TO_IMAGE, GOLD, k=3, allow_extra_queries=True)) == 4


def test_line_length_consistency_without_k(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [GOOD_LINES[0], '{"text_id": 2, "image_ids": [20, 10]}'])
    with pytest.raises(DataError, match=r"p.jsonl:2 \(text_id=2\): expected 3 image_ids \(as on the first line\)"):
        read_predictions(path, TEXT_TO_IMAGE)


def test_image_to_text_validation_against_inverted_gold(tmp_path):
    gold_i2t = invert_gold({1: {10}, 2: {10}, 3: {30}})
    path = tmp_path / "i2t.jsonl"
    write_predictions(path, IMAGE_TO_TEXT, [10, 30], [[2, 3], [3, 1]])
    predictions = validate_predictions(path, IMAGE_TO_TEXT, gold_i2t, k=2, gallery_ids={1, 2, 3})
    assert recall_at_k(predictions, gold_i2t, ks=(1, 2)) == {"r1": 100.0, "r2": 100.0}
    write_predictions(path, IMAGE_TO_TEXT, [10, 30], [[2, 7], [3, 1]])
    with pytest.raises(DataError, match=r"i2t.jsonl:1 \(image_id=10\): text_ids\[1\]=7 is not in the gallery"):
        validate_predictions(path, IMAGE_TO_TEXT, gold_i2t, k=2, gallery_ids={1, 2, 3})


def test_score_prediction_files_end_to_end(tmp_path, texts_jsonl):
    # gold: text 5 -> {10, 30}, 6 -> {20}, 7 -> {10, 20}; galleries padded with unannotated items.
    images, texts = [10, 20, 30] + list(range(40, 48)), [5, 6, 7] + list(range(100, 108))
    t2i, i2t = tmp_path / "t2i.jsonl", tmp_path / "i2t.jsonl"
    write_predictions(t2i, TEXT_TO_IMAGE, [5, 6, 7],
                      [[30, 10] + images[3:], [10] + images[3:] + [20], [30] + images[3:] + [10]])
    write_predictions(i2t, IMAGE_TO_TEXT, [10, 30, 20],
                      [[6, 7] + texts[3:], [5, 6] + texts[3:], [6, 5] + texts[3:]])
    result = score_prediction_files(texts_jsonl, t2i, i2t, k=10, image_ids=images, text_ids=texts)
    assert result[TEXT_TO_IMAGE] == pytest.approx(
        {"r1": 100 / 3, "r5": 100 / 3, "r10": 100.0, "mean_recall": (100 / 3 + 100 / 3 + 100) / 3})
    assert result[IMAGE_TO_TEXT]["r1"] == pytest.approx(200 / 3)  # images 30 and 20 hit at rank 1
    assert result[IMAGE_TO_TEXT]["r5"] == 100.0
    with pytest.raises(DataError, match="i2t.jsonl:1 \\(image_id=10\\): text_ids\\[2\\]=100 is not in the gallery"):
        score_prediction_files(texts_jsonl, t2i, i2t, k=10, image_ids=images, text_ids=[5, 6, 7])
