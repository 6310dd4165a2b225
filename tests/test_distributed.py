"""Cross-batch negatives across real ranks: two gloo processes started by ``paddle.distributed.launch``.

The claim under test: when each of ``W`` ranks scores its local half of a batch against the globally
gathered features, the mean of the ranks' losses is exactly the single-process CLIP loss of the whole
batch, and with ``gather_with_grad=True`` the data-parallel (averaged) gradient is exactly the
full-batch gradient. Without gathering, the loss would be a different number (fewer negatives), which
the test also checks, so the equality is evidence that the negatives really are global.

This file is also the rank program: ``python tests/test_distributed.py --model-dir ... --batch ... --out ...``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

N_RANKS = 2
GLOBAL_BATCH = 8


def _rank_main(argv: list[str]) -> None:
    import paddle
    import paddle.distributed as dist

    from vlretrieval.models.registry import get_family
    from vlretrieval.models.losses import UnequalBatchError, clip_contrastive_loss, clip_loss_from_logits
    from vlretrieval.training.losses import exit_after_peers

    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--batch", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    paddle.set_device("cpu")
    dist.init_parallel_env()
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(args.out)

    model = get_family("ernie_vil").load_model(args.model_dir)
    model.eval()  # no dropout, so ranks and the reference compute the same function
    # The same wrapper the Trainer uses when recompute is off; its gradient averaging is part of the claim.
    dp_model = paddle.DataParallel(model, find_unused_parameters=True)

    batch = np.load(args.batch)
    local = batch["pixel_values"].shape[0] // world
    rows = slice(rank * local, (rank + 1) * local)
    inputs = {key: paddle.to_tensor(batch[key][rows]) for key in ("pixel_values", "input_ids", "attention_mask")}

    result: dict[str, object] = {"rank": rank, "world": world, "local_batch": local}
    for gather_with_grad in (False, True):
        model.clear_gradients()
        output = dp_model(**inputs)
        loss = clip_contrastive_loss(
            output.image_features, output.text_features, output.logit_scale, gather_with_grad=gather_with_grad
        )
        loss.backward()
        result[f"loss_gather_with_grad_{gather_with_grad}"] = float(loss)
        grads = {name: p.grad.numpy() for name, p in model.named_parameters() if p.grad is not None}
        np.savez(out / f"grads_rank{rank}_{gather_with_grad}.npz", **grads)

    with paddle.no_grad():
        output = model(**inputs)
        scale = output.logit_scale.reshape([])
        logits = scale * paddle.matmul(output.text_features, output.image_features, transpose_y=True)
        labels = paddle.arange(local, dtype="int64")
        result["loss_local_only"] = float(clip_loss_from_logits(logits, logits.t(), labels))
        # Ranks with different batch sizes must fail loudly, on every rank, before any all_gather.
        size = local - rank
        try:
            clip_contrastive_loss(output.image_features[:size], output.text_features[:size], scale)
            result["unequal_error"] = None
        except UnequalBatchError as exc:
            result["unequal_error"] = str(exc)

    with open(out / f"rank{rank}.json", "w", encoding="utf-8") as handle:
        json.dump(result, handle)
    exit_after_peers()


if __name__ == "__main__":
    _rank_main(sys.argv[1:])


# --------------------------------------------------------------------------------------------------
# The test (single-process reference in this process, ranks in subprocesses)
# --------------------------------------------------------------------------------------------------

import paddle  # noqa: E402
import pytest  # noqa: E402

from vlretrieval.models.prepare import prepare_initial_model  # noqa: E402
from vlretrieval.models.registry import get_family  # noqa: E402
from vlretrieval.training.launcher import launch_env  # noqa: E402
from vlretrieval.models.losses import clip_contrastive_loss  # noqa: E402

pytestmark = pytest.mark.slow

CAPTIONS = [
    "左上角有一个红色的圆形",
    "右下角有一个蓝色的正方形",
    "中间有一个绿色的三角形和一个黄色的菱形",
    "紫色圆形位于右侧，橙色正方形位于左侧",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    model_dir = prepare_initial_model("ernie_vil", "tiny", root / "model", vocab_texts=CAPTIONS, seed=5)
    rng = np.random.default_rng(0)
    vocab_size = get_family("ernie_vil").load_tokenizer(model_dir).vocab_size
    lengths = rng.integers(4, 13, size=GLOBAL_BATCH)
    input_ids = np.zeros((GLOBAL_BATCH, 12), dtype=np.int64)
    mask = np.zeros_like(input_ids)
    for row, length in enumerate(lengths):
        input_ids[row, 0], input_ids[row, length - 1] = 1, 2  # [CLS] ... [SEP]
        input_ids[row, 1 : length - 1] = rng.integers(5, vocab_size, size=length - 2)
        mask[row, :length] = 1
    batch = {
        "pixel_values": rng.standard_normal((GLOBAL_BATCH, 3, 64, 64)).astype(np.float32),
        "input_ids": input_ids,
        "attention_mask": mask,
    }
    np.savez(root / "batch.npz", **batch)

    out = root / "out"
    out.mkdir()
    cmd = [
        sys.executable, "-m", "paddle.distributed.launch",
        "--nproc_per_node", str(N_RANKS), "--log_dir", str(root / "logs"), "--max_restart", "0",
        __file__, "--model-dir", str(model_dir), "--batch", str(root / "batch.npz"), "--out", str(out),
    ]
    proc = subprocess.run(cmd, env=launch_env(N_RANKS, use_gpu=False), capture_output=True, text=True, timeout=300)
    logs = "\n".join(
        f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted((root / "logs").glob("workerlog.*"))
    )
    assert proc.returncode == 0, f"launch failed ({proc.returncode}):\n{proc.stderr[-3000:]}\n{logs}"
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(N_RANKS)]
    return {"model_dir": model_dir, "batch": batch, "ranks": ranks, "out": out}


def _reference(setup, *, rows=slice(None)):
    """Single-process loss and gradients of the CLIP loss over ``rows`` of the batch."""
    paddle.set_device("cpu")
    model = get_family("ernie_vil").load_model(setup["model_dir"])
    model.eval()
    inputs = {key: paddle.to_tensor(value[rows]) for key, value in setup["batch"].items()}
    output = model(**inputs)
    loss = clip_contrastive_loss(output.image_features, output.text_features, output.logit_scale)
    loss.backward()
    grads = {name: p.grad.numpy() for name, p in model.named_parameters() if p.grad is not None}
    return float(loss), grads


def _relative_error(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    diff = sum(float(np.sum((a[k].astype(np.float64) - b[k]) ** 2)) for k in a)
    norm = sum(float(np.sum(b[k].astype(np.float64) ** 2)) for k in b)
    return (diff / norm) ** 0.5


def test_ranks_see_the_world(setup):
    assert [r["rank"] for r in setup["ranks"]] == [0, 1]
    assert all(r["world"] == N_RANKS and r["local_batch"] == GLOBAL_BATCH // N_RANKS for r in setup["ranks"])


def test_mean_of_rank_losses_equals_full_batch_loss(setup):
    full_loss, _ = _reference(setup)
    for key in ("loss_gather_with_grad_False", "loss_gather_with_grad_True"):
        mean = np.mean([r[key] for r in setup["ranks"]])
        assert mean == pytest.approx(full_loss, rel=1e-5, abs=1e-6), key
    # The ranks' losses themselves differ (different local rows), so the mean is not trivially equal.
    losses = [r["loss_gather_with_grad_False"] for r in setup["ranks"]]
    assert abs(losses[0] - losses[1]) > 1e-4


def test_without_gathering_the_loss_would_differ(setup):
    full_loss, _ = _reference(setup)
    local_mean = np.mean([r["loss_local_only"] for r in setup["ranks"]])
    # ln(8) vs ln(4) territory: half the negatives is a clearly different loss.
    assert abs(local_mean - full_loss) > 0.1
    # ... and each rank's local-only loss is exactly the single-process loss of its own half.
    half = GLOBAL_BATCH // N_RANKS
    for rank in range(N_RANKS):
        own, _ = _reference(setup, rows=slice(rank * half, (rank + 1) * half))
        assert setup["ranks"][rank]["loss_local_only"] == pytest.approx(own, rel=1e-5, abs=1e-6)


def test_gather_with_grad_gives_the_full_batch_gradient(setup):
    _, full_grads = _reference(setup)
    rank_grads = [dict(np.load(setup["out"] / f"grads_rank{r}_True.npz")) for r in range(N_RANKS)]
    # DataParallel averaged the gradients, so both ranks hold the same values.
    assert _relative_error(rank_grads[0], rank_grads[1]) < 1e-6
    assert _relative_error(rank_grads[0], full_grads) < 1e-4
    np.testing.assert_allclose(rank_grads[0]["temperature"], full_grads["temperature"], rtol=1e-4, atol=1e-7)


def test_gather_without_grad_is_only_an_approximation(setup):
    _, full_grads = _reference(setup)
    rank_grads = [dict(np.load(setup["out"] / f"grads_rank{r}_False.npz")) for r in range(N_RANKS)]
    assert _relative_error(rank_grads[0], rank_grads[1]) < 1e-6
    assert _relative_error(rank_grads[0], full_grads) > 1e-2
    # The temperature only enters through local logits, so its gradient is exact either way.
    np.testing.assert_allclose(rank_grads[0]["temperature"], full_grads["temperature"], rtol=1e-4, atol=1e-7)


def test_unequal_local_batches_fail_on_every_rank(setup):
    for result in setup["ranks"]:
        assert result["unequal_error"] is not None
        assert "rank 0: 4" in result["unequal_error"] and "rank 1: 3" in result["unequal_error"]
