"""Numeric and input corners: override typos, epsilons that underflow, complex parameters, non-finite gradients.

References: ``torch.optim.Adafactor`` (the ``torch`` preset on a NaN gradient), the dtype limits of ``torch.finfo``.
"""

from __future__ import annotations

import pytest
import torch

import hf_optim

ALL = ["Adam", "AdamW", "AdamAtan2", "RAdam", "SGDW", "AdaGrad", "RMSProp", "Adafactor"]


@pytest.mark.parametrize("name", ALL)
def test_unknown_override_key_names_the_closest(name):
    p, q = torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(2))
    with pytest.raises(ValueError, match=r"'lr_mul'.*Did you mean 'lr_mult'\?"):
        getattr(hf_optim, name)([p, q], param_overrides={p: {"lr_mul": 0.25}})
    with pytest.raises(ValueError, match="weight_decay_mult"):
        getattr(hf_optim, name)([p, q], param_overrides={p: {"weight_decay_mul": 2.0}})


def test_known_override_keys_still_apply():
    p, q = torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(2))
    opt = hf_optim.AdamW([p, q], lr=1e-2, param_overrides={p: {"lr_mult": 0.25, "eps": 1e-6}})
    group = next(g for g in opt.param_groups if p in g["params"])
    assert group["lr"] == pytest.approx(2.5e-3) and group["eps"] == 1e-6


@pytest.mark.parametrize(
    "name, knob",
    [
        ("Adam", "eps"),
        ("AdamW", "eps"),
        ("RAdam", "eps"),
        ("AdaGrad", "eps"),
        ("RMSProp", "eps"),
        ("Adafactor", "eps1"),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eps_that_is_zero_in_the_compute_dtype_is_refused(name, knob, dtype):
    p = torch.nn.Parameter(torch.randn(4, 3).to(dtype))
    with pytest.raises(ValueError, match=rf"{knob}=1e-50 is 0 in torch.float32"):
        getattr(hf_optim, name)([p], **{knob: 1e-50})


@pytest.mark.parametrize("name, knob", [("AdamW", "eps"), ("Adafactor", "eps1")])
def test_eps_representable_in_float64_is_accepted_there(name, knob):
    p = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    opt = getattr(hf_optim, name)([p], **{knob: 1e-50})
    p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.isfinite(p).all()  # a zero gradient: 0 / (0 + eps) = 0, not NaN


def test_adafactor_clamp_eps1_whose_square_underflows_is_refused():
    p = torch.nn.Parameter(torch.randn(4, 3))
    with pytest.raises(ValueError, match="eps1\\*\\*2"):
        hf_optim.Adafactor([p], preset="torch", eps1=1e-30)
    hf_optim.Adafactor([p], preset="torch", eps1=1e-15)  # 1e-30 > fp32 tiny: fine


def test_eps_check_also_runs_when_loading_a_state_dict():
    p = torch.nn.Parameter(torch.randn(4, 3))
    saved = hf_optim.AdamW([p]).state_dict()
    saved["param_groups"][0]["eps"] = 1e-50
    with pytest.raises(ValueError, match="param_groups\\[0\\]: eps=1e-50"):
        hf_optim.AdamW([p]).load_state_dict(saved)


def test_complex_parameters_refused_by_adafactor_before_any_state():
    real, z = torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(3, 2, dtype=torch.complex64))
    with pytest.raises(TypeError, match="complex"):
        hf_optim.Adafactor([real, z])
    opt = hf_optim.Adafactor([real])
    with pytest.raises(TypeError, match="complex"):
        opt.add_param_group({"params": [z]})
    assert len(opt.param_groups) == 1 and not opt.state  # the rejected group was removed again


@pytest.mark.parametrize("name", ["Adam", "AdamW", "RAdam", "AdamAtan2", "SGDW", "AdaGrad", "RMSProp"])
def test_complex_parameters_are_stepped_as_pairs_of_reals(name):
    """torch's rule for complex parameters: real and imaginary parts are independent coordinates, so stepping z
    equals stepping view_as_real(z) as a real parameter."""
    gen = torch.Generator().manual_seed(0)
    z = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.complex128, generator=gen))
    r = torch.nn.Parameter(torch.view_as_real(z.detach()).clone())
    kwargs = {"weight_decay": 1e-2, "implementation": "for-loop"}
    if name in ("SGDW", "RMSProp"):
        kwargs["momentum"] = 0.9
    opt_z, opt_r = getattr(hf_optim, name)([z], **kwargs), getattr(hf_optim, name)([r], **kwargs)
    for _ in range(4):
        g = torch.randn(4, 3, dtype=torch.complex128, generator=gen)
        z.grad, r.grad = g, torch.view_as_real(g).clone()
        opt_z.step()
        opt_r.step()
    torch.testing.assert_close(torch.view_as_real(z.detach()), r.detach(), atol=1e-12, rtol=0)
    assert all(v.is_complex() for s in opt_z.state.values() for k, v in s.items() if k != "step")


@pytest.mark.parametrize("shape", [(5,), (4, 3)], ids=["unfactored", "factored"])
@pytest.mark.parametrize("implementation", ["for-loop", "foreach"])
def test_torch_preset_equals_torch_on_a_nan_gradient(shape, implementation):
    """torch.optim.Adafactor takes the clip divisor with Python's max(1, nan) = 1: an unfactored tensor loses only
    the NaN entry (a factored one loses its row and column statistics, hence the whole tensor, in both)."""
    gen = torch.Generator().manual_seed(0)
    ref = torch.nn.Parameter(torch.randn(shape, generator=gen))
    ours = torch.nn.Parameter(ref.detach().clone())
    opt_ref = torch.optim.Adafactor([ref], lr=1e-2)
    opt_ours = hf_optim.Adafactor([ours], preset="torch", implementation=implementation)
    for t in range(3):
        g = torch.randn(shape, generator=gen)
        if t == 1:
            g.view(-1)[1] = float("nan")
        ref.grad, ours.grad = g.clone(), g.clone()
        opt_ref.step()
        opt_ours.step()
    torch.testing.assert_close(ours.detach(), ref.detach(), atol=1e-6, rtol=0, equal_nan=True)
    expected_nans = 1 if len(shape) == 1 else ref.numel()
    assert int(ours.isnan().sum()) == expected_nans


def test_other_presets_propagate_a_nan_rms_like_transformers():
    from transformers.optimization import Adafactor as HFAdafactor

    ref = torch.nn.Parameter(torch.randn(5))
    ours = torch.nn.Parameter(ref.detach().clone())
    opt_ref = HFAdafactor([ref], lr=None)
    opt_ours = hf_optim.Adafactor([ours], preset="hf")
    g = torch.randn(5)
    g[1] = float("nan")
    ref.grad, ours.grad = g.clone(), g.clone()
    opt_ref.step()
    opt_ours.step()
    assert bool(ref.isnan().all()) and bool(ours.isnan().all())
