"""Two-process CPU (gloo) check that Muon under FSDP2 equals one process (run by tests/test_muon_fsdp.py).

Both ranks see the same batches, so the averaged gradient equals the single-process one; with fp32 Newton-Schulz
(and the exact SVD path) the sharded run must match a plain single-process run to 1e-6 after several steps, for the
Muon matrices (gathered, orthogonalised whole, re-sharded) and the AdamW fallback alike.
"""

from __future__ import annotations

import copy
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # tests/ for conftest's tiny configs

from conftest import tiny_llama_config  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

import hf_optim  # noqa: E402
from _rank_exit import all_ok, finish  # noqa: E402

STEPS = 4


def train(model: torch.nn.Module, method: str) -> torch.optim.Optimizer:
    opt = hf_optim.create_optimizer(
        "muon_v2", model, lr=0.02, weight_decay=0.1, ns_dtype="float32", orthogonalize=method, adjust="rms"
    )
    gen = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        ids = torch.randint(0, 64, (2, 8), generator=gen)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    # intermediate 81 on 2 ranks: the MLP's up/gate matrices are sharded unevenly (41 + 40 rows)
    model = LlamaForCausalLM(tiny_llama_config(hidden_size=40, intermediate_size=81))
    for method in ("newton_schulz", "svd"):
        reference = copy.deepcopy(model)
        ref_opt = train(reference, method)
        sharded = copy.deepcopy(model)
        for layer in sharded.model.layers:
            fully_shard(layer)
        fully_shard(sharded)
        assert type(sharded.model.layers[0].self_attn.q_proj.weight).__name__ == "DTensor"
        opt = train(sharded, method)
        rules = {g["rule"] for g in opt.param_groups}
        assert rules == {"muon", "fallback"} == {g["rule"] for g in ref_opt.param_groups}
        worst = 0.0
        for (name, a), (_, b) in zip(sharded.named_parameters(), reference.named_parameters()):
            diff = (full(a.detach()) - b.detach()).abs().max().item()
            worst = max(worst, diff)
            assert diff <= 1e-6, f"{method} {name}: FSDP2 differs from one process by {diff:.3g}"
        if dist.get_rank() == 0:
            print(f"{method}: max |FSDP2 - single| = {worst:.3g} after {STEPS} steps", flush=True)
    all_ok("MUON_FSDP_OK")


if __name__ == "__main__":
    main()
    finish()
