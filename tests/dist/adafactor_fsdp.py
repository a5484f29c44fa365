"""Run by ``torchrun --nproc_per_node 2`` (gloo, CPU) from tests/test_adafactor_fsdp.py.

Each configuration trains a small model for 20 steps three ways from the same initial weights and data:
FSDP2 (``fully_shard``: every parameter a ``Shard(0)`` DTensor, rows 10 and 7 so one split is uneven), DDP, and a
single-process reference on the concatenated batch. Prints ``OK <max difference>`` per configuration on rank 0 and
exits non-zero when a run differs from the reference by more than 1e-6.

It also measures what the FSDP2 optimizer step communicates: every collective issued during ``opt.step()`` (c10d ops
such as ``dist.all_reduce`` and the functional collectives DTensor uses to gather or redistribute) is seen by a
dispatch mode, which adds up the sizes of the tensors involved. Per step the total must stay within
O(rows + cols) per matrix: the size of each parameter's factored statistics plus a few scalars (the RMS values),
far below the parameters' own sizes, so a gather of any parameter or gradient would fail the check. The DDP
step must communicate nothing (its gradients are already reduced). A last line checks the instrument itself: a
``full_tensor()`` gather under the same mode is counted at its full size.
"""

from __future__ import annotations

import copy
import os
import sys

import math

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from _rank_exit import finish
from hf_optim.optim.adafactor.optimizer import Adafactor, factor_dims

torch.set_num_threads(1)
STEPS, BATCH = 20, 4
CONFIGS = {  # adafactor_v2, factored (min size lowered so these small matrices are factored)
    "factored": dict(beta1=None),
    "factored-momentum-bf16": dict(beta1=0.9),
    "factored-scale-parameter-wd": dict(beta1=0.9, momentum_dtype="float32", scale_parameter=True,
                                        weight_decay=1e-4),
    "last-two": dict(beta1=None, factor_dims="last_two", scale_parameter=True),
}


class Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(12, 10)  # weight 10x12: rows split 5/5 (factored over the sharded dim)
        self.mid = torch.nn.Linear(10, 7)  # weight 7x10: rows split 4/3 (uneven)
        # 3-D, dim 0 split 4/3: "largest_two" factors dims (0, 2) (one sharded), "last_two" dims (1, 2) (local).
        self.cube = torch.nn.Parameter(torch.randn(7, 5, 6) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.mid(torch.tanh(self.inp(x))))  # (B, 7)
        return torch.einsum("bi,ikj->bkj", h, self.cube).pow(2).mean()


class CollectiveSizes(TorchDispatchMode):
    """Records ``(op, numel)`` for every collective dispatched while active: c10d ops (``dist.all_reduce``, ...) and
    functional collectives (what DTensor redistribution and ``full_tensor()`` use). ``numel`` is the larger of the
    input and output sizes, i.e. what one rank sends or receives at most."""

    #: Bookkeeping ops of the functional collectives that move no data.
    NOT_COMMUNICATION = ("wait_tensor", "_wrap_tensor_autograd")

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # let DTensor desugar into its collectives first; the mode then sees those
        out = func(*args, **kwargs)
        name = str(func)
        if func.namespace in ("c10d", "_c10d_functional") and not any(n in name for n in self.NOT_COMMUNICATION):
            size = lambda tree: sum(t.numel() for t in tree_leaves(tree) if isinstance(t, torch.Tensor))  # noqa: E731
            self.ops.append((name, max(size((args, kwargs)), size(out))))
        return out

    def total(self) -> int:
        return sum(n for _, n in self.ops)


def communication_budget(model: torch.nn.Module, group: dict) -> tuple[int, int]:
    """(allowed values per step, the parameters' total size): per parameter, the size of its factored statistics
    (rows + cols for a matrix) plus 4 scalars (RMS of x, RMS of the update, mean of the row statistics)."""
    allowed = 0
    for p in model.parameters():
        shape = tuple(p.shape)
        dims = factor_dims(p.shape, group)
        if dims is not None:
            row, col = dims
            allowed += math.prod(shape[:col] + shape[col + 1:]) + math.prod(shape[:row] + shape[row + 1:])
        allowed += 4
    return allowed, sum(p.numel() for p in model.parameters())


def local_batch(step: int, rank: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(BATCH, 12, generator=gen)


def main() -> int:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    failed = False
    for name, knobs in CONFIGS.items():
        kwargs = dict(lr=1e-2, min_dim_size_to_factor=2, **knobs)
        torch.manual_seed(0)
        reference = Model()
        initial = [p.detach().clone() for p in reference.parameters()]
        sharded, replicated = copy.deepcopy(reference), copy.deepcopy(reference)
        fully_shard(sharded.inp, mesh=mesh)
        fully_shard(sharded.mid, mesh=mesh)
        fully_shard(sharded, mesh=mesh)
        assert all(isinstance(p, DTensor) for p in sharded.parameters())
        ddp = DistributedDataParallel(replicated)
        runs = [(reference, Adafactor(reference.parameters(), **kwargs)),
                (sharded, Adafactor(sharded.parameters(), **kwargs)),
                (ddp, Adafactor(ddp.parameters(), **kwargs))]
        per_step = {1: [], 2: []}  # communicated values in each optimizer step: FSDP2, DDP
        for step in range(STEPS):
            for i, (model, opt) in enumerate(runs):
                opt.zero_grad()
                if i == 0:  # one process, both ranks' data: the mean loss has the same gradient as the average
                    loss = sum(model(local_batch(step, r)) for r in range(world)) / world
                else:
                    loss = model(local_batch(step, rank))
                loss.backward()
                if i == 0:
                    opt.step()
                    continue
                with CollectiveSizes() as sizes:  # the step only: backward's gradient reduce-scatter is FSDP's
                    opt.step()
                per_step[i].append(sizes.total())
        allowed, numel = communication_budget(sharded, runs[1][1].param_groups[0])
        comm_ok = max(per_step[1]) <= allowed < numel and max(per_step[1]) > 0 and max(per_step[2]) == 0
        worst = 0.0
        for p_ref, p_fsdp, p_ddp in zip(reference.parameters(), sharded.parameters(), replicated.parameters()):
            full = p_fsdp.full_tensor()  # gathered only here, to compare
            worst = max(worst, (full - p_ref).abs().max().item(), (p_ddp - p_ref).abs().max().item())
        moved = max((p_ref - p0).abs().max().item() for p_ref, p0 in zip(reference.parameters(), initial))
        ok = worst <= 1e-6 and moved > 1e-3 and comm_ok
        failed |= not ok
        if rank == 0:
            print(f"{'OK' if ok else 'FAIL'} {name} max_diff={worst:.3g} moved={moved:.3g} "
                  f"step_comm_max={max(per_step[1])} budget={allowed} param_numel={numel} "
                  f"ddp_step_comm={max(per_step[2])}", flush=True)
    # The instrument sees a gather of a whole parameter, so the budget check above can fail.
    probe = Model()
    fully_shard(probe, mesh=mesh)
    with CollectiveSizes() as sizes:
        gathered = probe.inp.weight.full_tensor()
    gathered = gathered.clone()  # wait for the asynchronous gather: no collective may be in flight at shutdown
    seen = sizes.total() >= gathered.numel()
    failed |= not seen
    if rank == 0:
        print(f"{'OK' if seen else 'FAIL'} instrument counts full_tensor() as {sizes.total()} >= {gathered.numel()}",
              flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    finish(main())
