"""What makes a resumed fine-tuning draw the random numbers an uninterrupted one draws.

* Data order: :class:`EpochBatchSampler` shuffles each epoch with a generator seeded by
  ``(seed, epoch)`` and tells the dataset the epoch, whose items then draw their augmentation and
  negatives from ``(seed, epoch, index)`` (:func:`vlretrieval.models.datasets.item_rng`). Neither
  depends on what was drawn before, in which thread or worker, or whether the run was restarted.
* Epochs end on an optimizer step: the sampler drops the micro-batches that cannot fill one
  (``len % gradient_accumulation_steps``). paddlenlp would otherwise add their gradients to the next
  epoch's first step, which a run resumed at the epoch boundary never computes.
* Everything else (paddle's generators, which draw dropout masks and sampled negatives, and
  Python's and numpy's global ones) is saved per rank in each checkpoint
  (:func:`save_rank_random_state`, ``rng_state.rank<r>.pkl``) and restored on that rank when training
  starts again (:func:`restore_rank_random_state`), whatever step in the epoch that is.
"""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path

import numpy as np

from ..io import atomic_open


def rank_random_state_file(checkpoint_dir: str | os.PathLike, rank: int) -> Path:
    return Path(checkpoint_dir) / f"rng_state.rank{int(rank)}.pkl"


def save_rank_random_state(checkpoint_dir: str | os.PathLike, rank: int) -> Path:
    """Write this process's random generators into ``checkpoint_dir`` (atomically)."""
    import paddle

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "paddle_cpu": paddle.framework.core.default_cpu_generator().get_state(),
        # The generators of the current device (CUDA ones on a GPU rank); the CPU one again otherwise.
        "paddle_device": paddle.get_rng_state(),
    }
    path = rank_random_state_file(checkpoint_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as handle:
        pickle.dump(state, handle, protocol=pickle.HIGHEST_PROTOCOL)
    return path


def restore_rank_random_state(checkpoint_dir: str | os.PathLike, rank: int) -> bool:
    """Set this process's random generators to those saved for ``rank``; False when none were saved.

    The file is one this run's own rank wrote into a checkpoint it verified complete, hence pickle.
    """
    import paddle

    path = rank_random_state_file(checkpoint_dir, rank)
    if not path.is_file():
        return False
    with open(path, "rb") as handle:
        state = pickle.load(handle)
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    paddle.framework.core.default_cpu_generator().set_state(state["paddle_cpu"])
    paddle.set_rng_state(state["paddle_device"])
    return True


def _shuffle_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([int(seed) & (2**64 - 1), int(epoch)]).generate_state(1)[0])


def epoch_batch_sampler(dataset, *, batch_size: int, num_replicas: int, rank: int, seed: int,
                        accumulation_steps: int):
    """A :class:`paddle.io.DistributedBatchSampler` (the class paddlenlp's Trainer calls
    ``set_epoch`` on) whose shuffle depends on ``(seed, epoch)`` and whose epochs hold a whole
    number of optimizer steps; it passes the epoch and seed on to ``dataset.set_epoch``."""
    from paddle.io import DistributedBatchSampler

    class EpochBatchSampler(DistributedBatchSampler):
        def __init__(self):
            super().__init__(dataset, batch_size=batch_size, num_replicas=num_replicas, rank=rank,
                             shuffle=True, drop_last=True)
            self.run_seed = int(seed)
            self.accumulation_steps = int(accumulation_steps)
            self.set_epoch(0)

        def set_epoch(self, epoch: int) -> None:
            self.run_epoch = int(epoch)
            # paddle shuffles with RandomState(self.epoch): its "epoch" is the shuffle seed.
            super().set_epoch(_shuffle_seed(self.run_seed, self.run_epoch))
            set_dataset_epoch = getattr(self.dataset, "set_epoch", None)
            if set_dataset_epoch is not None:
                set_dataset_epoch(self.run_epoch, self.run_seed)

        def __len__(self) -> int:
            micro_batches = super().__len__()
            return micro_batches - micro_batches % self.accumulation_steps

        def __iter__(self):
            kept = len(self)
            for position, batch in enumerate(super().__iter__()):
                if position >= kept:
                    return
                yield batch

    return EpochBatchSampler()
