"""How a rank of the two-process checks in this folder ends.

``finish`` waits for every rank, destroys the process group while the interpreter is fully alive, flushes the
output and leaves with ``os._exit``, skipping interpreter finalization.

Why not a plain return: after a check has passed and printed its result, a rank can still die at interpreter
finalization with ``terminate called without an active exception`` / ``Fatal Python error: Aborted`` (SIGABRT, the
main thread with no Python frame left), which torchrun then reports as a failed run. Measured on torch 2.13 CPU with
gloo: 1 run in about 20 of ``tests/test_mup_fsdp.py`` on 2 loaded cores. The abort is in torch's teardown (C++
objects of the gloo backend, DDP and FSDP2 freed during finalization while backend threads are still joinable; see
pytorch/pytorch#179291 for the same class of crash), not in the code under test, and finalization has nothing left
to check. Every result is decided, printed and flushed before ``os._exit``.
"""

from __future__ import annotations

import gc
import os
import sys
from typing import NoReturn

import torch.distributed as dist


def finish(code: int = 0) -> NoReturn:
    gc.collect()  # free DDP reducers / FSDP2 states (and their pending work) before the group goes
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def all_ok(marker: str) -> None:
    """After every rank's checks passed: wait for all of them, then rank 0 prints ``marker`` for the test to find."""
    dist.barrier()
    if dist.get_rank() == 0:
        print(marker, flush=True)
