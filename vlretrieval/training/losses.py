"""Ending a data-parallel training process.

The contrastive losses belong to the models whose objectives they are (:mod:`vlretrieval.models.losses`).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time

import paddle.distributed as dist


def stop_worker_processes(timeout: float = 5.0) -> None:
    """Stop this process's children: the DataLoader's worker processes.

    ``os._exit`` skips the DataLoader's own shutdown, and a Paddle worker whose parent is gone can
    stay blocked reading its index queue for good: every run with ``dataloader_num_workers`` would
    leave its workers behind, each holding a copy of its rank's memory.
    """
    children = multiprocessing.active_children()
    for child in children:
        child.terminate()
    deadline = time.monotonic() + timeout
    for child in children:
        child.join(max(0.0, deadline - time.monotonic()))
        if child.is_alive():
            child.kill()
            child.join(1.0)


def exit_after_peers() -> None:
    """End this rank once every rank is done, skipping interpreter teardown.

    With gloo on CPU, tearing down the communicators at interpreter exit sometimes aborts a rank
    (SIGABRT) after its work has completed and been saved, which the launcher reports as a failed
    job. The barrier makes sure no peer still needs this rank; the rank's DataLoader workers are
    stopped, and then nothing is left to clean up.
    """
    dist.barrier()
    stop_worker_processes()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
