"""This process' rank under a launcher, and leaving the torch.distributed process group (together at the end of a
run, or at once after a recipe error) for ``hf-optim train``."""

from __future__ import annotations

import os


def destroy() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


#: How long the ranks wait for each other at the end of a run before failing with the missing ranks' numbers. The
#: final evaluation's collectives have just synchronised them, so they arrive within seconds of each other.
FINAL_SYNC_TIMEOUT_S = 120


def leave() -> None:
    """All ranks leave the process group together, right after their last collective (the final evaluation).

    Called *before* rank 0 writes metrics.json, metrics.csv and loss.png, so that no rank sits in a collective while
    another does seconds of file and matplotlib work, and every rank closes its group before the interpreter exits
    (a live gloo group torn down at exit aborts: "terminate called without an active exception"). On gloo the sync is
    ``monitored_barrier``: a rank that does not arrive within :data:`FINAL_SYNC_TIMEOUT_S` is an error naming it,
    not a hang.
    """
    import datetime

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_world_size() > 1:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=FINAL_SYNC_TIMEOUT_S), wait_all_ranks=True)
        else:
            dist.barrier()
    dist.destroy_process_group()


def rank() -> int:
    """This process' rank under a launcher (``RANK``), 0 alone; known before the Trainer joins a process group."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0
