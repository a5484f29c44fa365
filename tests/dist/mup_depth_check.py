"""Two-process CPU (gloo) check that a *depth* muP plan survives DDP and FSDP2 (run by tests/test_mup_depth_dist.py).

A 6-layer LLaMA with base depth 2 and CompleteP (alpha = 1) or depth-µP (alpha = 0.5): the branch multipliers must
stay in place under both wrappers, and one optimizer step (same batch on both ranks, so the averaged gradient is the
single-process one) must give the per-parameter lr / eps of the plan and exactly the single-process parameters.
"""

from __future__ import annotations

import copy
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # tests/ for conftest's tiny configs

from conftest import tiny_llama_config

import hf_optim
import mup_integration as mi
from mup_integration.depth import BranchMultiplier
from _rank_exit import all_ok, finish

EPS = 1e-6


def step(model: torch.nn.Module, ids: torch.Tensor) -> torch.optim.Optimizer:
    opt = hf_optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-4, eps=EPS, implementation="for-loop",
                         param_overrides=mi.param_overrides(model, wd_rule="independent", eps=EPS))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    return opt


def groups_by_name(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, tuple[float, float]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)].removeprefix("module."): (g["lr"], g["eps"]) for g in opt.param_groups for p in g["params"]}


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def n_branch_hooks(model: torch.nn.Module) -> int:
    return sum(isinstance(h, BranchMultiplier) for m in model.modules() for h in m._forward_hooks.values())


def check(alpha: float, ids: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = mi.make_mup_model(tiny_llama_config(hidden_size=64, num_layers=6), base_width=32, base_depth=2,
                              depth_alpha=alpha)
    reference = copy.deepcopy(model)
    expected = groups_by_name(reference, step(reference, ids))
    m_l = 3.0  # 6 / 2; hand-written rules: hidden lr η m_N^-1 m_L^(α-1), block eps ε m_L^-α
    q_lr, q_eps = expected["model.layers.0.self_attn.q_proj.weight"]
    assert abs(q_lr - 1e-2 / 2 * m_l ** (alpha - 1)) < 1e-15 and abs(q_eps - EPS * m_l ** -alpha) < 1e-20
    assert expected["model.norm.weight"] == (1e-2, EPS)

    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(copy.deepcopy(model))
    assert mi.is_mup_applied(ddp) and n_branch_hooks(ddp) == 12
    assert groups_by_name(ddp, step(ddp, ids)) == expected
    for (n, a), (_, b) in zip(ddp.module.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=f"DDP alpha={alpha} {n}")

    from torch.distributed.fsdp import fully_shard

    sharded = copy.deepcopy(model)
    for layer in sharded.model.layers:
        fully_shard(layer)
    fully_shard(sharded)
    assert type(sharded.model.layers[0].self_attn.o_proj.weight).__name__ == "DTensor"
    assert mi.is_mup_applied(sharded) and n_branch_hooks(sharded) == 12
    assert groups_by_name(sharded, step(sharded, ids)) == expected
    for (n, a), (_, b) in zip(sharded.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(full(a.detach()), b.detach(), rtol=1e-5, atol=1e-7, msg=f"FSDP2 alpha={alpha} {n}")


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    for alpha in (0.5, 1.0):
        check(alpha, ids)
        print(f"rank {dist.get_rank()}: alpha={alpha} ok", flush=True)
    all_ok("MUP_DEPTH_DIST_OK")


if __name__ == "__main__":
    main()
    finish()
