"""BridgeTower fine-tuning (multi-positive ITC + ITM with hard negatives) and its pair scorer."""

from __future__ import annotations

import zipfile

import numpy as np
import paddle
import pytest

from vlretrieval.data.demo import DemoSpec, write_demo_archive
from vlretrieval.data.lmdb_store import SplitStore, serialize_split
from vlretrieval.models.base import eval_context_length
from vlretrieval.models.bridgetower import (
    FAMILY,
    BridgeTowerCollator,
    BridgeTowerPairScorer,
    BridgeTowerTrainingOutput,
    sample_hard_negatives,
)
from vlretrieval.models.vocab import build_vocab_file
from vlretrieval.errors import ConfigError
from vlretrieval.retrieval.rerank import itc_candidate_positions
from vlretrieval.training.trainer import apply_freezing, apply_learning_rate_multipliers, trainable_parameters

paddle.set_device("cpu")

CAPTIONS = ["a red circle", "two blue squares on the left", "a green triangle", "one yellow star at the top"]


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("bt_vocab") / "vocab.txt"
    build_vocab_file(CAPTIONS, path)
    return path


def _batch(tokenizer, image_ids, seed=0, share_pixels=True):
    texts = [CAPTIONS[i % len(CAPTIONS)] for i in range(len(image_ids))]
    encoded = FAMILY.tokenize(tokenizer, texts, max_len=16)
    pixels = np.random.default_rng(seed).standard_normal((len(image_ids), 3, 32, 32)).astype(np.float32)
    if share_pixels:
        first = {}
        for row, image_id in enumerate(image_ids):
            pixels[row] = pixels[first.setdefault(image_id, row)]
    return {
        "pixel_values": paddle.to_tensor(pixels),
        "input_ids": paddle.to_tensor(encoded["input_ids"]),
        "attention_mask": paddle.to_tensor(encoded["attention_mask"]),
        "image_ids": paddle.to_tensor(np.asarray(image_ids, dtype=np.int64)),
    }


def _log_softmax(x):
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


# -- objective ---------------------------------------------------------------------------------------


def test_itc_counts_every_pair_of_an_image_as_positive(vocab_file):
    model, tokenizer = FAMILY.build_tiny(vocab_file, seed=0)
    image_ids = [10, 10, 11, 12, 13]
    # Distinct views of image 10, as augmentation gives: with identical pixels the soft and one-hot
    # targets would give the same loss and the comparison below would prove nothing.
    output = model(**_batch(tokenizer, image_ids, share_pixels=False))
    assert isinstance(output, BridgeTowerTrainingOutput)
    parts = model.training_loss_parts(output)
    itc, itm = parts["itc"], parts["itm"]
    assert float(model.training_loss(output)) == pytest.approx(float(itc) + float(itm), rel=1e-6)

    t, i = output.text_features.numpy(), output.image_features.numpy()
    scale = float(output.logit_scale.numpy().reshape([]))
    ids = np.asarray(image_ids)
    targets = (ids[:, None] == ids[None, :]).astype(np.float64)
    targets /= targets.sum(axis=1, keepdims=True)
    logits = scale * t.astype(np.float64) @ i.astype(np.float64).T
    t2i = -(targets * _log_softmax(logits)).sum(axis=1).mean()
    i2t = -(targets * _log_softmax(logits.T)).sum(axis=1).mean()
    np.testing.assert_allclose(float(itc), (t2i + i2t) / 2, rtol=1e-5, atol=1e-6)
    # One-hot targets would call the second caption of image 10 a negative: a different loss.
    one_hot = -(np.diag(_log_softmax(logits)).mean() + np.diag(_log_softmax(logits.T)).mean()) / 2
    assert abs(one_hot - (t2i + i2t) / 2) > 1e-4

    n = len(image_ids)
    assert output.itm_labels.numpy().tolist() == [1] * n + [0] * (2 * n)
    assert output.itm_logits.shape == [3 * n, 2]
    np.testing.assert_allclose(float(model.training_loss(output)), float(itc) + float(itm), rtol=1e-6)


def test_itm_rows_are_the_sampled_pairs(vocab_file):
    model, tokenizer = FAMILY.build_tiny(vocab_file, seed=0)
    batch = _batch(tokenizer, [1, 1, 2, 3], seed=1)
    paddle.seed(123)
    output = model(**batch)  # eval mode: the sampler is the only consumer of random numbers
    paddle.seed(123)
    with paddle.no_grad():
        similarity = output.logit_scale * paddle.matmul(output.text_features, output.image_features, transpose_y=True)
        text_rows, negative_images = sample_hard_negatives(similarity, batch["image_ids"])
        image_rows, negative_texts = sample_hard_negatives(similarity.T, batch["image_ids"])
        texts = np.concatenate([np.arange(4), text_rows.numpy(), negative_texts.numpy()])
        images = np.concatenate([np.arange(4), negative_images.numpy(), image_rows.numpy()])
        expected = model(input_ids=paddle.to_tensor(batch["input_ids"].numpy()[texts]),
                         attention_mask=paddle.to_tensor(batch["attention_mask"].numpy()[texts]),
                         pixel_values=paddle.to_tensor(batch["pixel_values"].numpy()[images]))
    np.testing.assert_allclose(output.itm_logits.numpy(), expected.numpy(), rtol=1e-4, atol=1e-5)


def test_hard_negatives_skip_positives_and_follow_similarity():
    paddle.seed(0)
    ids = paddle.to_tensor(np.array([1, 1, 2, 3, 3, 3], dtype=np.int64))
    similarity = paddle.to_tensor(np.random.default_rng(0).standard_normal((6, 6)).astype(np.float32))
    # A huge positive must neither be drawn nor starve the negatives of probability mass.
    similarity[0, 1] = 1e4
    similarity[0, 4] = 8.0
    counts = np.zeros((6, 6), dtype=np.int64)
    for _ in range(300):
        rows, columns = sample_hard_negatives(similarity, ids)
        assert rows.numpy().tolist() == list(range(6))
        counts[rows.numpy(), columns.numpy()] += 1
    same = ids.numpy()[:, None] == ids.numpy()[None, :]
    assert counts[same].sum() == 0
    assert counts[0].argmax() == 4 and counts[0, 4] > 0.8 * counts[0].sum()

    rows, columns = sample_hard_negatives(similarity[:2, :2], ids[:2])  # one image only: no negative
    assert rows.shape == [0] and columns.shape == [0]


def test_training_reaches_every_trainable_parameter_and_learns(vocab_file):
    model, tokenizer = FAMILY.build_tiny(vocab_file, seed=1)
    frozen = apply_freezing(model)
    assert frozen == {name for name, _ in model.named_parameters() if name.startswith("itc_cross_modal_head.")}
    model.train()
    batch = _batch(tokenizer, [0, 0, 1, 1, 2, 3], seed=2)
    paddle.seed(0)
    loss = model.training_loss(model(**batch))
    assert np.isfinite(float(loss))
    loss.backward()
    trainable = trainable_parameters(model)
    silent = [name for name, p in trainable if p.grad is None or not np.abs(p.grad.numpy()).sum() > 0]
    assert silent == []
    for prefix in ("vision.", "text.", "cross_text_layers.", "cross_image_layers.", "itm_head.", "itc_text_head.",
                   "itc_image_head.", "log_logit_scale"):
        assert any(name.startswith(prefix) for name, _ in trainable), prefix
    model.clear_gradients()

    optimizer = paddle.optimizer.AdamW(learning_rate=1e-3, parameters=[p for _, p in trainable], weight_decay=0.01)
    losses = []
    for _ in range(20):
        loss = model.training_loss(model(**batch))
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        model.clamp_logit_scale_()
        losses.append(float(loss))
    assert np.mean(losses[-3:]) < 0.85 * np.mean(losses[:3]), losses


def test_lr_multipliers_scale_the_step_of_their_groups_under_one_global_clip(vocab_file):
    model, tokenizer = FAMILY.build_tiny(vocab_file, seed=1)
    apply_freezing(model)
    model.train()
    trainable = trainable_parameters(model)
    raised = apply_learning_rate_multipliers(model, trainable, {"cross_modal": 5.0, "heads": 2.0})
    rate_of = {name: float(param.optimize_attr["learning_rate"]) for name, param in trainable}
    assert raised == {name: rate for name, rate in rate_of.items() if rate != 1.0}
    expected = {"text.": 1.0, "vision.": 1.0, "modality_embeddings.": 1.0, "log_logit_scale": 1.0,
                "cross_text_layers.": 5.0, "image_link_towers.": 5.0, "text_pooler.": 5.0, "itm_head.": 2.0,
                "itc_image_head.": 2.0}
    for prefix, rate in expected.items():
        matching = [name for name in rate_of if name.startswith(prefix)]
        assert matching and all(rate_of[name] == rate for name in matching), prefix

    # SGD under a global-norm clip: every weight moves by lr x its multiplier x its gradient scaled by
    # the one factor clip / (norm of all gradients together), whatever group it is in.
    clip = 1e-3
    optimizer = paddle.optimizer.SGD(learning_rate=0.1, parameters=[p for _, p in trainable],
                                     grad_clip=paddle.nn.ClipGradByGlobalNorm(clip))
    paddle.seed(0)
    model.training_loss(model(**_batch(tokenizer, [0, 0, 1, 1, 2, 3], seed=2))).backward()
    before = {name: param.numpy().copy() for name, param in trainable}
    grads = {name: param.grad.numpy().astype(np.float64) for name, param in trainable}
    scale = clip / np.sqrt(sum(float((g ** 2).sum()) for g in grads.values()))
    assert scale < 1.0  # the clip is active
    optimizer.step()
    for name, param in trainable:
        # float32 rounds an update to about eps x the weight's size
        rounding = 2 * float(np.finfo(np.float32).eps) * float(np.abs(before[name]).max()) + 1e-9
        np.testing.assert_allclose(before[name] - param.numpy(), 0.1 * rate_of[name] * scale * grads[name],
                                   rtol=1e-3, atol=rounding, err_msg=name)

    with pytest.raises(ConfigError, match="does not define"):
        apply_learning_rate_multipliers(model, trainable, {"cross_modal": 5.0, "pooler": 5.0})
    only_frozen = [(name, p) for name, p in trainable if not name.startswith(("itm_head.", "itc_"))]
    with pytest.raises(ConfigError, match="holds no trainable parameter"):
        apply_learning_rate_multipliers(model, only_frozen, {"heads": 5.0})
    assert apply_learning_rate_multipliers(model, trainable, {}) == {}
    assert {float(p.optimize_attr["learning_rate"]) for _, p in trainable} == {1.0}


# -- data and scoring --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A serialized English demo split (6 images, 12 captions) and a tiny model saved over its vocabulary."""
    root = tmp_path_factory.mktemp("bt_split")
    spec = DemoSpec(name="demo_bt", seed=5, sizes={"train": 6}, captions_per_image=2, caption_language="en")
    write_demo_archive(spec, root / "demo.zip")
    zipfile.ZipFile(root / "demo.zip").extractall(root / "dl")
    serialize_split("raw_tsv", root / "dl", "train", root / "lmdb", entry={"format": "raw_tsv", "root": "demo_bt"},
                    progress=False, workers=1)
    with SplitStore(root / "lmdb") as store:
        texts = [t.text for t in store.texts()]
    build_vocab_file(texts, root / "vocab.txt")
    model, tokenizer = FAMILY.build_tiny(root / "vocab.txt", seed=3)
    FAMILY.save(model, tokenizer, root / "model")
    return root


def test_dataset_and_collator_feed_the_training_forward(saved):
    model = FAMILY.load_model(saved / "model")
    tokenizer = FAMILY.load_tokenizer(saved / "model")
    dataset = FAMILY.training_dataset(model, tokenizer, saved / "lmdb", max_len=16, hparams={"hflip": False})
    items = [dataset[i] for i in range(4)]
    batch = FAMILY.training_collator(tokenizer, model, max_len=16)(items)
    assert isinstance(FAMILY.training_collator(tokenizer, model, max_len=16), BridgeTowerCollator)
    assert set(batch) == {"pixel_values", "input_ids", "attention_mask", "image_ids"}
    assert batch["image_ids"].tolist() == [item["image_id"] for item in items]
    output = model(**{key: paddle.to_tensor(value) for key, value in batch.items()})
    assert isinstance(output, BridgeTowerTrainingOutput)
    assert np.isfinite(float(model.training_loss(output)))


@pytest.mark.parametrize("cache_bytes", [None, 0])
def test_pair_scorer_matches_the_model(saved, cache_bytes):
    kwargs = {} if cache_bytes is None else {"cache_bytes": cache_bytes}
    scorer = BridgeTowerPairScorer(saved / "model", saved / "lmdb", batch_size=5, **kwargs)
    assert (scorer._text_cache is None) == (cache_bytes == 0)
    model = FAMILY.load_model(saved / "model")
    tokenizer = FAMILY.load_tokenizer(saved / "model")
    transform = FAMILY.image_transform(model, train=False)
    with SplitStore(saved / "lmdb") as store:
        texts = store.texts()
        image_ids = store.image_ids()
        pixels = np.stack([transform(store.open_image(i)) for i in image_ids])
    assert scorer.text_ids.tolist() == [t.text_id for t in texts]
    assert scorer.image_ids.tolist() == image_ids
    encoded = FAMILY.tokenize(tokenizer, [t.text for t in texts],
                              max_len=eval_context_length(saved / "model", FAMILY))
    input_ids, mask = paddle.to_tensor(encoded["input_ids"]), paddle.to_tensor(encoded["attention_mask"])

    picked = np.array([11, 0, 3, 7, 5, 2, 9], dtype=np.int64)
    with paddle.no_grad():
        for image_index in (0, 4):
            expected = model.score_pairs(
                input_ids=paddle.index_select(input_ids, paddle.to_tensor(picked)),
                attention_mask=paddle.index_select(mask, paddle.to_tensor(picked)),
                pixel_values=paddle.to_tensor(np.repeat(pixels[image_index:image_index + 1], len(picked), axis=0)),
            ).numpy()
            scores = scorer.score(image_index, picked)
            assert scores.dtype == np.float32
            np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-5)

        t = model.itc_text_features(model.encode_texts_unimodal(input_ids, mask)).numpy()
        i = model.itc_image_features(model.encode_images_unimodal(paddle.to_tensor(pixels))).numpy()
    similarity = t @ i.T
    t2i, i2t = itc_candidate_positions(scorer, 3)
    np.testing.assert_array_equal(t2i, np.argsort(-similarity, axis=1, kind="stable")[:, :3])
    np.testing.assert_array_equal(i2t, np.argsort(-similarity.T, axis=1, kind="stable")[:, :3])
    scorer.close()


def test_family_pair_scorer(saved):
    scorer = FAMILY.pair_scorer(saved / "model", saved / "lmdb", batch_size=4)
    assert isinstance(scorer, BridgeTowerPairScorer)
    assert np.isfinite(scorer.score(1, np.arange(len(scorer.text_ids)))).all()
    scorer.close()
