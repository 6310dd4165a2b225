"""What every registered model family must do, checked on its ``tiny`` architecture.

For each family of :func:`vlretrieval.models.registry.list_families`: a seeded tiny build over a
vocabulary built from captions; encoding (dual encoders: ``[n, d]`` L2-normalised features) or pair
scoring (cross encoders: finite scores that do not depend on the batch); a save/load round trip with
identical outputs; export where the kind supports it; and the training loss, whose gradient must be
finite, reach the trainable parameters, agree with a finite difference and lower the loss.
"""

from __future__ import annotations

import math

import numpy as np
import paddle
import pytest

from vlretrieval.errors import ConfigError
from vlretrieval.models.base import read_model_info
from vlretrieval.models.export import export_model
from vlretrieval.models.registry import CROSS_ENCODER, DUAL_ENCODER, get_family, list_families
from vlretrieval.models.vocab import build_vocab_file

paddle.set_device("cpu")

CAPTIONS = [
    "一个红色的圆形在左边",
    "两个蓝色的正方形在右上角",
    "a green triangle at the top",
    "two small yellow circles on the left",
]
TAGS = ["circle red", "square blue", "triangle green", "circle yellow"]
N = len(CAPTIONS)
# Trainable parameters that may rightly get no gradient from the training loss: parameters the
# forward pass never reads (for instance a pooler the family's text feature does not use).
MIN_REACHED_FRACTION = 0.8


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    build_vocab_file(CAPTIONS + TAGS, path)
    return path


_BUILT: dict[str, tuple] = {}


def _built(name: str, vocab_file) -> tuple:
    """The family, its seeded tiny model and tokenizer, built once per module."""
    if name not in _BUILT:
        family = get_family(name)
        _BUILT[name] = (family, *family.build_tiny(vocab_file, seed=0))
    return _BUILT[name]


@pytest.fixture(params=list_families())
def built(request, vocab_file):
    return _built(request.param, vocab_file)


@pytest.fixture(params=list_families(DUAL_ENCODER))
def dual_encoder(request, vocab_file):
    return _built(request.param, vocab_file)


@pytest.fixture(params=list_families(CROSS_ENCODER))
def cross_encoder(request, vocab_file):
    return _built(request.param, vocab_file)


def _reads_regions(family) -> bool:
    return "regions" in family.extra_inputs


def _batch(family, model, tokenizer, *, training: bool) -> dict[str, paddle.Tensor]:
    """Model inputs of the ``N`` aligned pairs, built by the family's own training collator; without
    ``training`` the keys a training batch adds (labels, image ids, negatives) are left out."""
    rng = np.random.default_rng(0)
    max_len = 24
    if _reads_regions(family):
        captions = family.text_pieces(tokenizer, CAPTIONS)
        tags = family.text_pieces(tokenizer, TAGS)
        regions = [(0.5 * rng.standard_normal((k, family.feature_dim))).astype(np.float32) for k in (3, 1, 4, 2)]
        # Each item is a positive and one negative (the next pair's caption), as the dataset makes them.
        items = [{"examples": [
            {"caption_ids": captions[i], "tag_ids": tags[i], "regions": regions[i], "label": 1},
            {"caption_ids": captions[(i + 1) % N], "tag_ids": tags[i], "regions": regions[i], "label": 0},
        ]} for i in range(N)]
        if not training:
            items = [{"examples": item["examples"][:1]} for item in items]
    else:
        size = family.image_size(model)
        encoded = family.tokenize(tokenizer, CAPTIONS, max_len=max_len)
        lengths = encoded["attention_mask"].sum(axis=1)
        # Pairs 0 and 1 show the same image, so a multi-positive objective sees a shared image too.
        image_ids = [7, 7, 8, 9]
        pixels = {i: rng.standard_normal((3, size, size)).astype(np.float32) for i in set(image_ids)}
        items = [{
            "pixel_values": pixels[image_ids[i]],
            "input_ids": encoded["input_ids"][i][: lengths[i]],
            "attention_mask": encoded["attention_mask"][i][: lengths[i]],
            "image_id": image_ids[i],
            "text_id": i,
        } for i in range(N)]
    batch = family.training_collator(tokenizer, model, max_len=max_len)(items)
    if not training:
        for key in ("labels", "image_ids", "negative_candidates"):
            batch.pop(key, None)
    return {key: paddle.to_tensor(value) for key, value in batch.items()}


def _outputs(family, model, batch) -> list[np.ndarray]:
    """What the family's kind produces for a batch: features, or pair scores."""
    model.eval()
    with paddle.no_grad():
        if family.kind == DUAL_ENCODER:
            text_inputs = {key: value for key, value in batch.items() if key != "pixel_values"}
            return [model.encode_images(batch["pixel_values"]).numpy(), model.encode_texts(**text_inputs).numpy()]
        return [model.score_pairs(**batch).numpy()]


def _trainable(model) -> dict[str, paddle.Tensor]:
    frozen = set(getattr(model, "frozen_parameter_names", lambda: set())())
    return {name: p for name, p in model.named_parameters() if not p.stop_gradient and name not in frozen}


def _loss(model, batch) -> paddle.Tensor:
    # Dropout off and negatives drawn from one seed, so the loss is a function of the weights alone.
    model.eval()
    paddle.seed(123)
    return model.training_loss(model(**batch))


def test_kind_is_the_registered_one_and_the_build_is_seeded(built, vocab_file):
    family, model, tokenizer = built
    assert family.kind in (DUAL_ENCODER, CROSS_ENCODER) and family.implemented_kind() == family.kind
    assert isinstance(model, family.model_class) and not model.training
    again, _ = family.build_tiny(vocab_file, seed=0)
    first, second = model.state_dict(), again.state_dict()
    assert list(first) == list(second)
    assert all(np.array_equal(first[name].numpy(), second[name].numpy()) for name in first)


def test_dual_encoders_embed_into_one_normalised_space(dual_encoder):
    family, model, tokenizer = dual_encoder
    images, texts = _outputs(family, model, _batch(family, model, tokenizer, training=False))
    assert images.shape == texts.shape == (N, model.embedding_dim)
    np.testing.assert_allclose(np.linalg.norm(images, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, rtol=1e-5)
    assert float(model.logit_scale().reshape([-1])[0]) == pytest.approx(1 / 0.07, rel=1e-4)
    with pytest.raises(ValueError, match="both"):
        model(pixel_values=paddle.zeros([1, 3, 8, 8]))


def test_cross_encoders_score_pairs_independently_of_the_batch(cross_encoder):
    family, model, tokenizer = cross_encoder
    batch = _batch(family, model, tokenizer, training=False)
    (scores,) = _outputs(family, model, batch)
    assert scores.shape == (N,) and np.isfinite(scores).all()
    for i in range(N):
        alone = {key: value[i:i + 1] for key, value in batch.items()}
        if "attention_mask" in alone:  # drop the padding the other pairs needed
            width = int(alone["attention_mask"].sum())
            alone = {key: value[:, :width] if key in ("input_ids", "attention_mask", "token_type_ids") else value
                     for key, value in alone.items()}
        np.testing.assert_allclose(_outputs(family, model, alone)[0], scores[i:i + 1], rtol=1e-4, atol=1e-5)


def test_save_and_load_give_identical_outputs(built, tmp_path):
    family, model, tokenizer = built
    batch = _batch(family, model, tokenizer, training=False)
    expected = _outputs(family, model, batch)
    family.save_atomic(model, tokenizer, tmp_path / "model")
    info = read_model_info(tmp_path / "model")
    assert (info["family"], info["kind"]) == (family.name, family.kind)
    loaded = family.load_model(tmp_path / "model")
    reloaded_tokenizer = family.load_tokenizer(tmp_path / "model")
    assert not loaded.training
    for got, want in zip(_outputs(family, loaded, batch), expected):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(_batch(family, loaded, reloaded_tokenizer, training=False)["input_ids"].numpy(),
                                  batch["input_ids"].numpy())


def test_export_where_the_kind_has_one(built, tmp_path):
    family, model, tokenizer = built
    family.save_atomic(model, tokenizer, tmp_path / "model")
    if family.kind != DUAL_ENCODER:
        with pytest.raises(ConfigError, match="needs a dual_encoder"):
            export_model(tmp_path / "model", tmp_path / "export", verify=False)
        assert not (tmp_path / "export").exists()
        return
    manifest = export_model(tmp_path / "model", tmp_path / "export", threads=1)
    assert (manifest["family"], manifest["kind"]) == (family.name, DUAL_ENCODER)
    assert manifest["embedding_dim"] == model.embedding_dim
    verification = manifest["verification"]
    assert min(verification["image_min_cosine"], verification["text_min_cosine"]) > 0.9999


def test_training_loss_has_a_correct_gradient(built):
    family, model, tokenizer = built
    batch = _batch(family, model, tokenizer, training=True)
    trainable = _trainable(model)
    loss = _loss(model, batch)
    assert loss.shape in ([], [1]) and math.isfinite(float(loss))
    loss.backward()
    gradients = {name: p.grad.numpy().copy() for name, p in trainable.items() if p.grad is not None}
    model.clear_gradients()
    assert all(np.isfinite(g).all() for g in gradients.values())
    reached = [name for name, g in gradients.items() if np.abs(g).max() > 0]
    assert len(reached) >= MIN_REACHED_FRACTION * len(trainable), sorted(set(trainable) - set(reached))
    temperature = getattr(model, "temperature_parameter", None)
    if temperature is not None:
        assert temperature in reached

    # Finite difference along the single weight with the steepest gradient.
    name = max(gradients, key=lambda n: np.abs(gradients[n]).max())
    index = np.unravel_index(np.abs(gradients[name]).argmax(), gradients[name].shape)
    parameter = trainable[name]
    original = parameter.numpy().copy()
    eps = 1e-2 * max(1.0, abs(float(original[index])))

    def loss_at(delta: float) -> float:
        moved = original.copy()
        moved[index] += delta
        parameter.set_value(moved)
        with paddle.no_grad():
            return float(_loss(model, batch))

    numeric = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
    parameter.set_value(original)
    assert numeric == pytest.approx(float(gradients[name][index]), rel=0.05, abs=1e-4)

    # A small step against the gradient lowers the loss.
    before = float(loss)
    norm = math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in gradients.values()))
    originals = {n: trainable[n].numpy().copy() for n in gradients}
    step = 1e-3 / norm
    for n, g in gradients.items():
        trainable[n].set_value(originals[n] - step * g)
    with paddle.no_grad():
        after = float(_loss(model, batch))
    for n, value in originals.items():
        trainable[n].set_value(value)
    assert after < before
    with paddle.no_grad():
        assert float(_loss(model, batch)) == before  # weights restored exactly
    model.eval()
