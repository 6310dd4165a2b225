"""The CLIP contrastive loss against an independent numpy computation (single process)."""

from __future__ import annotations

import numpy as np
import paddle
import pytest

from vlretrieval.models.losses import (
    clip_contrastive_loss,
    clip_loss_from_logits,
    distributed_world,
    gather_features,
)

paddle.set_device("cpu")


def _normalised(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def brute_force_clip_loss(images: np.ndarray, texts: np.ndarray, scale: float) -> float:
    """Row-by-row: -log softmax of the matching pair, both directions, averaged."""
    n = images.shape[0]
    t2i = 0.0
    i2t = 0.0
    for k in range(n):
        row = np.array([scale * texts[k] @ images[j] for j in range(n)])
        t2i -= row[k] - np.log(np.exp(row - row.max()).sum()) - row.max()
        col = np.array([scale * images[k] @ texts[j] for j in range(n)])
        i2t -= col[k] - np.log(np.exp(col - col.max()).sum()) - col.max()
    return float((t2i / n + i2t / n) / 2)


def test_single_process_is_not_distributed():
    assert distributed_world() == (0, 1)


@pytest.mark.parametrize("n,d,scale", [(1, 4, 1.0), (5, 8, 14.285), (16, 32, 100.0)])
def test_loss_matches_brute_force(n, d, scale):
    rng = np.random.default_rng(n * 31 + d)
    images, texts = _normalised(rng, n, d), _normalised(rng, n, d)
    expected = brute_force_clip_loss(images, texts, scale)
    got = clip_contrastive_loss(
        paddle.to_tensor(images, dtype="float32"),
        paddle.to_tensor(texts, dtype="float32"),
        paddle.to_tensor([scale], dtype="float32"),
    )
    assert got.shape == [] or got.size == 1
    np.testing.assert_allclose(float(got), expected, rtol=1e-5, atol=1e-5)


def test_single_pair_loss_is_zero():
    # One pair has no negatives: both softmaxes are over one entry.
    x = paddle.to_tensor([[0.6, 0.8]], dtype="float32")
    assert float(clip_contrastive_loss(x, x, 10.0)) == pytest.approx(0.0, abs=1e-7)


def test_loss_is_asymmetric_in_directions_but_averaged():
    rng = np.random.default_rng(7)
    images, texts = _normalised(rng, 6, 5), _normalised(rng, 6, 5)
    scale = 3.0
    logits = scale * texts @ images.T
    labels = np.arange(6)
    t2i = -_log_softmax(logits)[labels, labels].mean()
    i2t = -_log_softmax(logits.T)[labels, labels].mean()
    assert abs(t2i - i2t) > 1e-3  # the two directions genuinely differ on random data
    got = clip_loss_from_logits(
        paddle.to_tensor(logits, dtype="float32"),
        paddle.to_tensor(logits.T.copy(), dtype="float32"),
        paddle.to_tensor(labels, dtype="int64"),
    )
    np.testing.assert_allclose(float(got), (t2i + i2t) / 2, rtol=1e-5)


def test_gather_is_identity_in_one_process():
    x = paddle.to_tensor(np.arange(6, dtype="float32").reshape(3, 2))
    for with_grad in (False, True):
        assert gather_features(x, gather_with_grad=with_grad) is x


def test_gradient_matches_finite_differences():
    rng = np.random.default_rng(3)
    n, d, scale = 4, 3, 5.0
    images, texts = _normalised(rng, n, d), _normalised(rng, n, d)
    for gather_with_grad in (False, True):
        img = paddle.to_tensor(images, dtype="float64", stop_gradient=False)
        txt = paddle.to_tensor(texts, dtype="float64", stop_gradient=False)
        loss = clip_contrastive_loss(img, txt, paddle.to_tensor(scale, dtype="float64"), gather_with_grad=gather_with_grad)
        loss.backward()
        eps = 1e-6
        numeric = np.zeros_like(images)
        for i in range(n):
            for j in range(d):
                plus, minus = images.copy(), images.copy()
                plus[i, j] += eps
                minus[i, j] -= eps
                numeric[i, j] = (brute_force_clip_loss(plus, texts, scale) - brute_force_clip_loss(minus, texts, scale)) / (2 * eps)
        np.testing.assert_allclose(img.grad.numpy(), numeric, rtol=1e-5, atol=1e-7)


def test_logit_scale_gradient_flows():
    rng = np.random.default_rng(11)
    images, texts = _normalised(rng, 5, 4), _normalised(rng, 5, 4)
    temperature = paddle.to_tensor([np.log(1 / 0.07)], dtype="float32", stop_gradient=False)
    loss = clip_contrastive_loss(
        paddle.to_tensor(images, dtype="float32"), paddle.to_tensor(texts, dtype="float32"), paddle.exp(temperature)
    )
    loss.backward()
    assert temperature.grad is not None and np.isfinite(temperature.grad.numpy()).all()
    assert float(temperature.grad.abs().sum()) > 0


def test_shape_errors_are_explicit():
    a = paddle.zeros([4, 8])
    with pytest.raises(ValueError, match="pair up"):
        clip_contrastive_loss(a, paddle.zeros([3, 8]), 1.0)
    with pytest.raises(ValueError, match=r"\[batch, dim\]"):
        clip_contrastive_loss(paddle.zeros([4]), paddle.zeros([4]), 1.0)
