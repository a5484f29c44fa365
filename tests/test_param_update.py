"""``param_update``: bf16 parameters trained without an fp32 master copy, for every optimizer.

``"stochastic"`` rounds the fp32 result up or down at random, unbiased; ``"kahan"`` keeps what rounding lost in a
bf16 compensation buffer and adds it back before the next update (Kahan summation), so 200 steps end where fp32
training ends, to the bf16 resolution of the final weights; ``"nearest"`` (the default) loses every update below half
a bf16 ulp.
"""

from __future__ import annotations

import io

import pytest
import torch

import hf_optim
from hf_optim import precision

#: One optimizer of each family, at settings whose first update is ~lr for every coordinate.
FAMILIES = {
    "AdamW": (hf_optim.AdamW, dict(lr=1e-3)),
    "SGDW": (hf_optim.SGDW, dict(lr=1e-3, momentum=0.9)),
    "RMSProp": (hf_optim.RMSProp, dict(lr=1e-4)),
    "AdaGrad": (hf_optim.AdaGrad, dict(lr=1e-3)),
    "Adafactor": (hf_optim.Adafactor, dict(lr=1e-3, preset="hf", relative_step=False, scale_parameter=False)),
    "Muon": (hf_optim.Muon, dict(lr=2e-3)),
}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_stochastic_rounding_is_unbiased(name):
    """One step from 1.0 by an update far below half a bf16 ulp (2^-9 below 1): nearest loses it in every element,
    stochastic keeps it on average (the mean over 2^17 elements within 5 standard errors of the fp32 result)."""
    cls, kwargs = FAMILIES[name]
    shape = (256, 512)
    gen = torch.Generator().manual_seed(0)
    grad = torch.rand(shape, generator=gen) + 0.5
    results = {}
    for dtype, mode in ((torch.float32, "nearest"), (torch.bfloat16, "nearest"), (torch.bfloat16, "stochastic")):
        p = torch.nn.Parameter(torch.ones(shape, dtype=dtype))
        opt = cls([p], param_update=mode, **kwargs)
        p.grad = grad.to(dtype)
        opt.step()
        results[(dtype, mode)] = p.detach().double()
    exact = results[(torch.float32, "nearest")]
    moved = (1.0 - exact).mean().item()
    assert 2e-4 < moved < 2.0**-9  # below half an ulp: round to nearest gives 1.0 back
    assert torch.equal(results[(torch.bfloat16, "nearest")], torch.ones(shape, dtype=torch.float64))
    stochastic = results[(torch.bfloat16, "stochastic")]
    assert set(torch.unique(stochastic).tolist()) <= {1.0, 1.0 - 2.0**-8}  # the two bf16 neighbours
    error = (stochastic - exact).mean().item()
    standard_error = 2.0**-8 / 2 / stochastic.numel() ** 0.5  # a two-point draw has std <= ulp / 2
    assert abs(error) < 5 * standard_error, (error, standard_error)


def _regression(cls, kwargs, dtype, mode, steps=200):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=gen)
    y = x @ torch.randn(64, 16, generator=gen)
    w = torch.nn.Parameter((torch.randn(64, 16, generator=gen) * 0.1).to(dtype))
    opt = cls([w], param_update=mode, **kwargs)
    for _ in range(steps):
        loss = (x @ w.float() - y).square().mean()
        w.grad = torch.autograd.grad(loss, w)[0]
        opt.step()
    return w.detach().float(), opt


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_kahan_equals_fp32_training_over_200_steps(name):
    """Least squares, 200 steps: bf16 weights with a Kahan buffer end within 0.5 % (relative L2) of fp32 training, the
    resolution of bf16 weights; round to nearest ends 5-20 % away."""
    cls, kwargs = FAMILIES[name]
    if name in ("RMSProp", "AdaGrad"):
        kwargs = {**kwargs, "lr": 1e-3}
    reference, _ = _regression(cls, kwargs, torch.float32, "nearest")
    kahan, opt = _regression(cls, kwargs, torch.bfloat16, "kahan")
    nearest, _ = _regression(cls, kwargs, torch.bfloat16, "nearest")
    relative = lambda w: ((w - reference).norm() / reference.norm()).item()
    assert relative(kahan) < 5e-3, relative(kahan)
    assert relative(kahan) < relative(nearest) / 10, (relative(kahan), relative(nearest))
    (w,) = opt.param_groups[0]["params"]
    assert opt.state[w][precision.COMPENSATION].dtype == torch.bfloat16


def test_kahan_state_round_trips_and_continues_bitwise():
    cls, kwargs = FAMILIES["AdamW"]
    _, opt = _regression(cls, kwargs, torch.bfloat16, "kahan", steps=5)
    (p,) = opt.param_groups[0]["params"]
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    q = torch.nn.Parameter(p.detach().clone())
    resumed = cls([q], param_update="kahan", **kwargs)
    resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    assert resumed.state[q][precision.COMPENSATION].dtype == torch.bfloat16
    for _ in range(3):
        g = torch.randn(p.shape).bfloat16()
        p.grad, q.grad = g, g.clone()
        opt.step()
        resumed.step()
    assert torch.equal(p, q)


def test_fp32_parameters_are_unaffected_and_keep_no_buffer():
    results = []
    for mode in precision.PARAM_UPDATES:
        p = torch.nn.Parameter(torch.ones(8, 8))
        opt = hf_optim.AdamW([p], lr=1e-3, weight_decay=0.0, param_update=mode)
        p.grad = torch.ones(8, 8)
        opt.step()
        assert precision.COMPENSATION not in opt.state[p]
        results.append(p.detach())
    assert torch.allclose(results[0], torch.full((8, 8), 1 - 1e-3))
    assert all(torch.equal(r, results[0]) for r in results)


def test_bad_param_update_is_a_value_error_naming_it():
    for cls, kwargs in FAMILIES.values():
        with pytest.raises(ValueError, match=r"param_update.*'fp32_master'"):
            cls([torch.nn.Parameter(torch.zeros(4, 4))], param_update="fp32_master", **kwargs)
    with pytest.raises(ValueError, match="stochastic_rounding"):
        hf_optim.Adafactor([torch.nn.Parameter(torch.zeros(4, 4))], stochastic_rounding=True, param_update="kahan")
