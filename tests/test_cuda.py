"""CUDA correctness (skipped without a GPU; `.ci/gpu` runs them with the GPU benchmarks): every row of the central
table steps CUDA tensors like CPU ones, and Muon on CUDA equals torch.optim.Muon on CUDA."""

from __future__ import annotations

import pytest
import torch
from optimizer_cases import CASE_IDS, CASES, Case
from test_invariants import base_lrs, grads_for, make_params, train

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_cuda_steps_like_cpu(case: Case):
    # fp32 Newton-Schulz for Muon: CPU and CUDA matmuls then differ by fp32 rounding only
    overrides = {"ns_dtype": "float32"} if case.cls_name == "Muon" else {}
    cpu = make_params()
    cuda = [p.detach().cuda().requires_grad_(True) for p in cpu]
    opt_cpu, opt_cuda = case.build(cpu, **overrides), case.build(cuda, **overrides)
    lrs = base_lrs(opt_cpu)
    train(opt_cpu, cpu, range(6), lrs)
    train(opt_cuda, cuda, range(6), lrs)
    for a, b in zip(cpu, cuda):
        torch.testing.assert_close(b.detach().cpu(), a.detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("adjust", [("original", None), ("rms", "match_rms_adamw")], ids=["original", "rms"])
def test_muon_on_cuda_matches_torch_muon(adjust):
    from hf_optim.optim.muon.optimizer import Muon

    torch.manual_seed(0)
    init = [torch.randn(s, device="cuda") for s in [(64, 32), (32, 96), (48, 48)]]
    ours = [torch.nn.Parameter(x.clone()) for x in init]
    ref = [torch.nn.Parameter(x.clone()) for x in init]
    opt = Muon(ours, lr=0.02, adjust=adjust[0], rule="muon")
    torch_opt = torch.optim.Muon(ref, lr=0.02, adjust_lr_fn=adjust[1])
    for step in range(20):
        for a, b, g in zip(ours, ref, grads_for(ours, step)):
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        torch_opt.step()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=20 * 0.02 * 2**-8)
