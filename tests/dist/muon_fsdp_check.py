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


def build(model: torch.nn.Module, method: str, **knobs) -> torch.optim.Optimizer:
    return hf_optim.create_optimizer(
        "muon_v2", model, lr=0.02, weight_decay=0.1, ns_dtype="float32", orthogonalize=method, adjust="rms", **knobs
    )


def batches(first: int, last: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = [torch.randint(0, 64, (2, 8), generator=gen) for _ in range(last)]
    return ids[first:]


def steps(model: torch.nn.Module, opt: torch.optim.Optimizer, first: int, last: int) -> None:
    for ids in batches(first, last):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


def train(model: torch.nn.Module, method: str) -> torch.optim.Optimizer:
    opt = build(model, method)
    steps(model, opt, 0, STEPS)
    return opt


def shard(model: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def worst_difference(sharded: torch.nn.Module, reference: torch.nn.Module, what: str, tol: float = 1e-6) -> float:
    worst = 0.0
    for (name, a), (_, b) in zip(sharded.named_parameters(), reference.named_parameters()):
        diff = (full(a.detach()) - b.detach()).abs().max().item()
        worst = max(worst, diff)
        assert diff <= tol, f"{what} {name}: FSDP2 differs from one process by {diff:.3g}"
    return worst


def check_state_dict_round_trip(model: torch.nn.Module) -> None:
    """Sharded save after 2 steps -> fresh sharded model + optimizer -> load -> 2 more steps: bitwise the run that
    never stopped; and the full (gathered) optimizer state dict continues a single process within 1e-6."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    half = STEPS // 2
    straight = shard(copy.deepcopy(model))
    straight_opt = build(straight, "newton_schulz")
    steps(straight, straight_opt, 0, STEPS)

    first = shard(copy.deepcopy(model))
    first_opt = build(first, "newton_schulz")
    steps(first, first_opt, 0, half)
    saved_model = {k: v.detach().clone() for k, v in first.state_dict().items()}
    saved_opt = copy.deepcopy(first_opt.state_dict())
    full_options = StateDictOptions(full_state_dict=True)
    full_model = get_model_state_dict(first, options=full_options)
    full_opt = get_optimizer_state_dict(first, first_opt, options=full_options)

    resumed = shard(copy.deepcopy(model))
    resumed.load_state_dict(saved_model)
    resumed_opt = build(resumed, "newton_schulz")
    resumed_opt.load_state_dict(saved_opt)
    steps(resumed, resumed_opt, half, STEPS)
    for (name, a), (_, b) in zip(resumed.named_parameters(), straight.named_parameters()):
        assert torch.equal(full(a.detach()), full(b.detach())), f"sharded resume {name}: not bitwise equal"

    # the gathered checkpoint into one process (2 ranks -> 1): continues as the run that never stopped
    single = copy.deepcopy(model)
    single.load_state_dict(full_model)
    single_opt = build(single, "newton_schulz")
    set_optimizer_state_dict(single, single_opt, full_opt)
    steps(single, single_opt, half, STEPS)
    worst = worst_difference(straight, single, "full state dict -> 1 process")
    if dist.get_rank() == 0:
        print(f"state dict: sharded resume bitwise; gathered -> 1 process max diff {worst:.3g}", flush=True)


def check_qk_clip(model: torch.nn.Module) -> None:
    """qk_clip under FSDP2 with a different half of each batch per rank: the max logit is the max over ranks and the
    sharded q/k rows are rescaled locally, so it equals one process on the whole batch (within fp32 noise of the
    split batch); and the clip did act."""
    rank = dist.get_rank()
    boosted = copy.deepcopy(model)
    with torch.no_grad():
        for layer in boosted.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
    gen = torch.Generator().manual_seed(2)
    whole = [torch.randint(0, 64, (4, 8), generator=gen) for _ in range(STEPS)]
    tau = 1.0
    runs = {}
    for name, setting in (("clip", tau), ("plain", None)):
        reference = copy.deepcopy(boosted)
        opt = build(reference, "newton_schulz", qk_clip=setting)
        for ids in whole:
            reference(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        runs[name] = reference
    sharded = shard(copy.deepcopy(boosted))
    opt = build(sharded, "newton_schulz", qk_clip=tau)
    for ids in whole:
        part = ids[rank * 2 : rank * 2 + 2]  # equal halves: the mean of the two ranks' losses is the whole batch's
        sharded(input_ids=part, labels=part).loss.backward()
        opt.step()
        opt.zero_grad()
    # the ranks' half-batch losses sum in another order than the whole batch's: fp32 noise, which AdamW's
    # normalisation of the embedding's small gradients lifts to ~1e-6; a wrong maximum would move q/k by ~`acted`
    worst = worst_difference(sharded, runs["clip"], "qk_clip", tol=1e-5)
    q = "model.layers.0.self_attn.q_proj.weight"
    acted = (runs["clip"].get_parameter(q) - runs["plain"].get_parameter(q)).abs().max().item()
    assert acted > 1e-3, f"qk_clip={tau} changed nothing ({acted:.3g}): the check would not see a wrong clip"
    if dist.get_rank() == 0:
        print(f"qk_clip: max |FSDP2 - single| = {worst:.3g}; the clip moved q_proj by {acted:.3g}", flush=True)


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    # intermediate 81 on 2 ranks: the MLP's up/gate matrices are sharded unevenly (41 + 40 rows)
    model = LlamaForCausalLM(tiny_llama_config(hidden_size=40, intermediate_size=81))
    for method in ("newton_schulz", "svd"):
        reference = copy.deepcopy(model)
        ref_opt = train(reference, method)
        sharded = shard(copy.deepcopy(model))
        assert type(sharded.model.layers[0].self_attn.q_proj.weight).__name__ == "DTensor"
        opt = train(sharded, method)
        rules = {g["rule"] for g in opt.param_groups}
        assert rules == {"muon", "fallback"} == {g["rule"] for g in ref_opt.param_groups}
        worst = worst_difference(sharded, reference, method)
        if dist.get_rank() == 0:
            print(f"{method}: max |FSDP2 - single| = {worst:.3g} after {STEPS} steps", flush=True)
    check_state_dict_round_trip(model)
    check_qk_clip(model)
    all_ok("MUON_FSDP_OK")


if __name__ == "__main__":
    main()
    finish()
