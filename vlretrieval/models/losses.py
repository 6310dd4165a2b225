"""Contrastive losses with cross-batch negatives across data-parallel ranks: CLIP's
(:func:`clip_contrastive_loss`) and its multi-positive form (:func:`multi_positive_itc_loss`).

Definitions, for ``W`` ranks each holding a local batch of ``B`` aligned pairs (global batch
``N = W * B``, rank ``r`` owns global rows ``r*B .. r*B+B-1``):

* ``T_r``, ``I_r``: the local L2-normalised text and image features ``[B, d]``; ``T``, ``I`` the
  global ones ``[N, d]`` (ranks concatenated in rank order).
* Rank ``r`` scores its *local* rows against the *global* batch::

      L_r = ( CE(s * T_r @ I.T, y_r) + CE(s * I_r @ T.T, y_r) ) / 2,   y_r = r*B + arange(B)

  where ``CE`` is the mean cross-entropy over the ``B`` rows and ``s`` the logit scale.
* The mean of ``L_r`` over ranks equals the single-process CLIP loss of the global batch (each
  global row appears in exactly one rank's mean, all with weight ``1/B``), so with data-parallel
  gradient averaging the ranks together optimise exactly the full-batch loss.

Gradients through the gathered features (``gather_with_grad``):

* ``False`` (default, as in the reference): the other ranks' features are constants. The local slice
  of the gathered matrix is replaced by the local tensor, so the local features get the gradient of
  ``L_r`` through both their rows and their columns, but not the gradient that the other ranks' losses
  ``L_q`` (q != r) have with respect to them as negatives. Cheaper, and an approximation.
* ``True``: :class:`_AllGatherWithGrad` gathers in the forward pass and, in the backward pass,
  sums the gradient of the gathered matrix over all ranks and keeps the local slice. Rank ``r`` thus
  receives ``sum_q dL_q / dT_r``; after data-parallel averaging (``1/W * sum_r``) the parameter
  gradient is exactly ``d(mean_q L_q)/d theta``, i.e. the full-batch gradient. Merely re-inserting
  the local tensor into a gathered copy (the ``False`` path) cannot give this: the terms
  ``dL_q/dT_r`` are computed on rank ``q`` and must be communicated back.

All ranks must hold the same local batch size (``all_gather`` needs equal shapes, and the label
offsets assume it); training uses ``drop_last`` so this holds, and unequal sizes raise
:class:`UnequalBatchError` naming every rank's size.
"""

from __future__ import annotations

import paddle
import paddle.distributed as dist
import paddle.nn.functional as F
from paddle.autograd import PyLayer

from ..errors import VLRetrievalError


class UnequalBatchError(VLRetrievalError):
    """Ranks hold local batches of different sizes, so cross-batch negatives are ill-defined."""


def distributed_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _group_rank_and_size(group) -> tuple[int, int]:
    if group is None:
        return distributed_world()
    return group.rank, group.nranks


def _all_gather_list(tensor: paddle.Tensor, group) -> list[paddle.Tensor]:
    gathered: list[paddle.Tensor] = []
    dist.all_gather(gathered, tensor, group=group)
    return gathered


def check_equal_batch_sizes(local_size: int, group=None) -> None:
    """Raise :class:`UnequalBatchError` unless every rank of ``group`` has ``local_size`` rows."""
    _, world = _group_rank_and_size(group)
    if world == 1:
        return
    sizes = [int(t.item()) for t in _all_gather_list(paddle.to_tensor([local_size], dtype="int64"), group)]
    if len(set(sizes)) != 1:
        raise UnequalBatchError(
            "cross-batch negatives need the same local batch size on every rank, got "
            + ", ".join(f"rank {r}: {n}" for r, n in enumerate(sizes))
            + " (train with drop_last=True, or pad the last batch)"
        )


class _AllGatherWithGrad(PyLayer):
    """All-gather along axis 0 whose backward returns the local slice of the rank-summed gradient."""

    @staticmethod
    def forward(ctx, tensor: paddle.Tensor, rank: int, group):
        ctx.rank, ctx.rows, ctx.group = rank, tensor.shape[0], group
        return paddle.concat(_all_gather_list(tensor, group), axis=0)

    @staticmethod
    def backward(ctx, grad: paddle.Tensor):
        # Every rank's loss depends on every rank's features: sum the contributions, keep ours.
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = ctx.rank * ctx.rows
        return grad[start : start + ctx.rows]


def gather_features(
    features: paddle.Tensor, *, gather_with_grad: bool = False, group=None
) -> paddle.Tensor:
    """Concatenate ``features`` ``[B, d]`` of all ranks in rank order into ``[W*B, d]``.

    With ``gather_with_grad=False`` the result carries gradient only through this rank's own slice;
    with ``True`` through every slice (see the module docstring). A single process returns
    ``features`` unchanged.
    """
    rank, world = _group_rank_and_size(group)
    if world == 1:
        return features
    if gather_with_grad:
        return _AllGatherWithGrad.apply(features, rank, group)
    with paddle.no_grad():
        gathered = _all_gather_list(features.detach(), group)
    gathered[rank] = features
    return paddle.concat(gathered, axis=0)


def clip_loss_from_logits(logits_per_text: paddle.Tensor, logits_per_image: paddle.Tensor, labels: paddle.Tensor):
    """Mean of the text->image and image->text cross-entropies (each a mean over rows)."""
    return (F.cross_entropy(logits_per_text, labels) + F.cross_entropy(logits_per_image, labels)) / 2.0


def clip_contrastive_loss(
    image_features: paddle.Tensor,
    text_features: paddle.Tensor,
    logit_scale: paddle.Tensor | float,
    *,
    gather_with_grad: bool = False,
    group=None,
    check_sizes: bool = True,
) -> paddle.Tensor:
    """This rank's CLIP loss ``L_r``: local rows against the global batch (see the module docstring).

    ``image_features`` and ``text_features`` are aligned ``[B, d]`` L2-normalised matrices (row ``i``
    of each is a positive pair); ``logit_scale`` multiplies the cosine similarities. Returns a scalar.
    With one process this is the standard CLIP loss of the batch.
    """
    if image_features.ndim != 2 or text_features.ndim != 2:
        raise ValueError(f"features must be [batch, dim], got {image_features.shape} and {text_features.shape}")
    if image_features.shape != text_features.shape:
        raise ValueError(
            f"image and text features must pair up row by row, got {image_features.shape} and {text_features.shape}"
        )
    local = image_features.shape[0]
    rank, world = _group_rank_and_size(group)
    if world > 1 and check_sizes:
        check_equal_batch_sizes(local, group)
    all_images = gather_features(image_features, gather_with_grad=gather_with_grad, group=group)
    all_texts = gather_features(text_features, gather_with_grad=gather_with_grad, group=group)
    if isinstance(logit_scale, paddle.Tensor):
        logit_scale = logit_scale.reshape([])
    logits_per_text = logit_scale * paddle.matmul(text_features, all_images, transpose_y=True)
    logits_per_image = logit_scale * paddle.matmul(image_features, all_texts, transpose_y=True)
    labels = paddle.arange(rank * local, rank * local + local, dtype="int64")
    return clip_loss_from_logits(logits_per_text, logits_per_image, labels)


def multi_positive_itc_loss(
    text_features: paddle.Tensor,
    image_features: paddle.Tensor,
    image_ids: paddle.Tensor,
    logit_scale: paddle.Tensor | float,
    *,
    gather_with_grad: bool = False,
    group=None,
) -> paddle.Tensor:
    """This rank's image-text contrastive loss with every same-image pair counted as positive.

    Local rows score against the global batch, as :func:`clip_contrastive_loss` does (so the mean over ranks is the full-batch loss). The target of a row is uniform over the
    global columns whose image id equals the row's: a COCO image appears with several captions in
    one batch, and calling those captions negatives would push apart what the data calls a match.
    Soft-target cross-entropy in both directions (text->image, image->text), averaged.
    """
    local = text_features.shape[0]
    _, world = _group_rank_and_size(group)
    if world > 1:
        check_equal_batch_sizes(local, group)
    all_texts = gather_features(text_features, gather_with_grad=gather_with_grad, group=group)
    all_images = gather_features(image_features, gather_with_grad=gather_with_grad, group=group)
    image_ids = image_ids.reshape([-1]).astype("int64")
    all_ids = gather_features(image_ids, gather_with_grad=False, group=group)
    if isinstance(logit_scale, paddle.Tensor):
        logit_scale = logit_scale.reshape([])
    targets = (image_ids.unsqueeze(1) == all_ids.unsqueeze(0)).astype(text_features.dtype)
    targets = targets / targets.sum(axis=1, keepdim=True)
    logits_per_text = logit_scale * paddle.matmul(text_features, all_images, transpose_y=True)
    logits_per_image = logit_scale * paddle.matmul(image_features, all_texts, transpose_y=True)

    def soft_cross_entropy(logits: paddle.Tensor) -> paddle.Tensor:
        return -(targets * F.log_softmax(logits, axis=1)).sum(axis=1).mean()

    return (soft_cross_entropy(logits_per_text) + soft_cross_entropy(logits_per_image)) / 2.0
