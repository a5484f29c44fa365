"""Two-process CPU (gloo) check that the muP plan survives DDP and FSDP2 (run by tests/test_mup_fsdp.py via torchrun).

Both ranks see the same batch, so the averaged gradient equals the single-process one and one optimizer step under
DDP or FSDP2 must give exactly the parameters of a plain single-process step with the same muP multipliers.
"""

from __future__ import annotations

import copy
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # tests/ for conftest's tiny configs

from conftest import tiny_llama_config  # noqa: E402

import hf_optim  # noqa: E402
import mup_integration as mi  # noqa: E402
from _rank_exit import all_ok, finish  # noqa: E402


def step(model: torch.nn.Module, ids: torch.Tensor) -> torch.optim.Optimizer:
    opt = hf_optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-4, implementation="for-loop",
                         param_overrides=mi.param_overrides(model, wd_rule="independent"))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    return opt


def lr_by_name(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, float]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)].removeprefix("module."): g["lr"] for g in opt.param_groups for p in g["params"]}


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = mi.make_mup_model(tiny_llama_config(hidden_size=64), base_width=32)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))

    reference = copy.deepcopy(model)
    ref_opt = step(reference, ids)
    expected_lr = lr_by_name(reference, ref_opt)
    assert expected_lr["model.layers.0.self_attn.q_proj.weight"] == 1e-2 / 2
    assert expected_lr["model.norm.weight"] == 1e-2

    # DDP: names gain a `module.` prefix
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(copy.deepcopy(model))
    assert all(n.startswith("module.") for n, _ in ddp.named_parameters())
    assert mi.is_mup_applied(ddp)
    ddp_opt = step(ddp, ids)
    assert lr_by_name(ddp, ddp_opt) == expected_lr
    for (n, a), (_, b) in zip(ddp.module.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=f"DDP {n}")

    # FSDP2: parameters become DTensor shards, names and the plan stay; mup's p.infshape would be dropped here
    from torch.distributed.fsdp import fully_shard

    sharded = copy.deepcopy(model)
    for layer in sharded.model.layers:
        fully_shard(layer)
    fully_shard(sharded)
    assert type(sharded.model.layers[0].self_attn.q_proj.weight).__name__ == "DTensor"
    assert mi.is_mup_applied(sharded)
    fsdp_opt = step(sharded, ids)
    assert lr_by_name(sharded, fsdp_opt) == expected_lr
    for (n, a), (_, b) in zip(sharded.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(full(a.detach()), b.detach(), rtol=1e-5, atol=1e-7, msg=f"FSDP2 {n}")

    all_ok("MUP_DIST_OK")


if __name__ == "__main__":
    main()
    finish()
