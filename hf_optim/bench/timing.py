"""Timing primitives of ``hf-optim bench``: one synchronised, timed optimizer step, and repeats paired with a reference.

Why pairs: on a shared machine the load changes within seconds. Timing a case's repeats in one block and the
reference in another (even before *and* after every case) lets a burst of load land on one side only, which once
produced a "1178x fused AdamW" row on a busy 2-core machine. Interleaving step by step puts both sides of every ratio
under the same load; alternating which one goes first cancels the cache advantage of going second.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

Clock = Callable[[], float]


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer state (0-d step counters included)."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(optimizer: torch.optim.Optimizer, device: torch.device, clock: Clock = time.perf_counter) -> float:
    _sync(device)
    start = clock()
    optimizer.step()
    _sync(device)
    return clock() - start


@dataclass
class Reference:
    """The reference optimizer, alive for the whole run: each timed step of a case is paired with one of its steps."""

    optimizer: torch.optim.Optimizer
    device: torch.device
    clock: Clock

    def step(self) -> float:
        return timed_step(self.optimizer, self.device, self.clock)


def timed_repeats(
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    repeats: int,
    reference: Reference | None,
    clock: Clock = time.perf_counter,
) -> tuple[list[float], list[float]]:
    """``repeats`` timed steps of ``optimizer`` and, with a reference, as many reference steps taken in pairs.

    The order within a pair alternates (reference first on even repeats) so that neither side always finds the
    tensors the other just streamed in cache. Both steps of a pair see the same machine load, so their ratio does not
    depend on what else ran before or after this case.
    """
    if reference is None:
        return [timed_step(optimizer, device, clock) for _ in range(repeats)], []
    reference.step()  # untimed: the case's warm-up evicted the reference's data from the caches
    times: list[float] = []
    reference_times: list[float] = []
    for i in range(repeats):
        if i % 2 == 0:
            reference_times.append(reference.step())
            times.append(timed_step(optimizer, device, clock))
        else:
            times.append(timed_step(optimizer, device, clock))
            reference_times.append(reference.step())
    return times, reference_times
