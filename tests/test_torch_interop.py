"""Switching a run from torch (or transformers) to hf-optim: load the original class's state dict, continue.

Reference: the original optimizer's own continuation. Each case runs k steps with the original class, saves its
state dict, runs n more steps with it; a copy of the parameters at step k is continued by the hf-optim class built
with its *defaults* (the hyperparameters come from the loaded dict) for the same n gradients. fp32, 1e-6.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from transformers.optimization import Adafactor as HFAdafactor

import hf_optim

K, N = 3, 5
SHAPES = [(6, 5), (5,), (2, 3, 4)]


def _params(complex_: bool = False) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    dtype = torch.complex64 if complex_ else torch.float32
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in SHAPES]


def _grads(params: list[torch.Tensor], step: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)


def _run(opt: torch.optim.Optimizer, params: list[torch.Tensor], steps: range) -> None:
    for t in steps:
        _grads(params, t)
        opt.step()


#: (id, original optimizer factory, hf-optim class built with defaults)
CASES: list[tuple[str, Callable[[list], torch.optim.Optimizer], Callable[[list], torch.optim.Optimizer]]] = [
    ("adam", lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2), hf_optim.Adam),
    ("adamw", lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, betas=(0.8, 0.99)), hf_optim.AdamW),
    ("adamw->Adam", lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1), hf_optim.Adam),
    ("radam", lambda p: torch.optim.RAdam(p, lr=1e-2, weight_decay=1e-2), hf_optim.RAdam),
    (
        "radam-decoupled",
        lambda p: torch.optim.RAdam(p, lr=1e-2, weight_decay=1e-2, decoupled_weight_decay=True),
        hf_optim.RAdam,
    ),
    (
        "sgd-nesterov",
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2),
        hf_optim.SGDW,
    ),
    ("sgd-dampening", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.1), hf_optim.SGDW),
    ("sgd-plain", lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=1e-2), hf_optim.SGDW),
    (
        "adagrad",
        lambda p: torch.optim.Adagrad(p, lr=0.1, lr_decay=0.01, weight_decay=1e-2, initial_accumulator_value=0.1),
        hf_optim.AdaGrad,
    ),
    (
        "rmsprop",
        lambda p: torch.optim.RMSprop(p, lr=1e-2, momentum=0.5, centered=True, weight_decay=1e-2),
        hf_optim.RMSProp,
    ),
    ("torch-adafactor", lambda p: torch.optim.Adafactor(p, lr=1e-2, weight_decay=1e-2), hf_optim.Adafactor),
    ("transformers-adafactor-relative", lambda p: HFAdafactor(p, lr=None), hf_optim.Adafactor),
    (
        "transformers-adafactor-momentum",
        lambda p: HFAdafactor(p, lr=1e-2, relative_step=False, scale_parameter=False, beta1=0.9, weight_decay=1e-2),
        hf_optim.Adafactor,
    ),
]


@pytest.mark.parametrize("make_torch, make_ours", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_continue_from_original_state_dict(make_torch, make_ours):
    params = _params()
    original = make_torch(params)
    _run(original, params, range(K))
    saved = copy.deepcopy(original.state_dict())
    ours_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    _run(original, params, range(K, K + N))

    ours = make_ours(ours_params)
    ours.load_state_dict(saved)
    _run(ours, ours_params, range(K, K + N))
    for ref, got in zip(params, ours_params):
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    moved = max((a - b).abs().max().item() for a, b in zip(ours_params, _params()))
    assert moved > 1e-3  # the continuation did train


@pytest.mark.parametrize(
    "make_torch, make_ours",
    [
        (lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1), hf_optim.AdamW),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), hf_optim.SGDW),
        (lambda p: torch.optim.Adagrad(p, lr=0.1), hf_optim.AdaGrad),
        (lambda p: torch.optim.RMSprop(p, lr=1e-2, momentum=0.5, centered=True), hf_optim.RMSProp),
    ],
    ids=["adamw", "sgd", "adagrad", "rmsprop"],
)
def test_continue_complex_parameters(make_torch, make_ours):
    """torch steps complex parameters (real and imaginary parts as coordinates); so does hf-optim, from its state."""
    params = _params(complex_=True)
    original = make_torch(params)
    _run(original, params, range(K))
    saved = copy.deepcopy(original.state_dict())
    ours_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    _run(original, params, range(K, K + N))
    ours = make_ours(ours_params)
    ours.load_state_dict(saved)
    _run(ours, ours_params, range(K, K + N))
    for ref, got in zip(params, ours_params):
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    assert all(v.is_complex() for s in ours.state.values() for k, v in s.items() if k != "step" and v is not None)


@pytest.mark.parametrize("cls", [hf_optim.SGDW, hf_optim.AdaGrad, hf_optim.RMSProp])
def test_complex_from_scratch_equals_torch(cls):
    torch_cls = {
        hf_optim.SGDW: torch.optim.SGD,
        hf_optim.AdaGrad: torch.optim.Adagrad,
        hf_optim.RMSProp: torch.optim.RMSprop,
    }[cls]
    kwargs = {"lr": 1e-2, "momentum": 0.9} if cls is not hf_optim.AdaGrad else {"lr": 1e-2}
    ref, ours = _params(complex_=True), _params(complex_=True)
    _run(torch_cls(ref, **kwargs), ref, range(N))
    _run(cls(ours, weight_decay_mode="l2", **kwargs), ours, range(N))
    for a, b in zip(ref, ours):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0)


def test_live_knobs_fill_what_torch_lacks():
    """hf-only knobs (implementation, lr_peak) keep the live optimizer's values; torch's define the maths."""
    params = _params()
    original = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.05)
    _run(original, params, range(K))
    ours = hf_optim.AdamW(
        _params(), lr=1e-2, implementation="foreach", weight_decay=1e-4, weight_decay_mode="independent"
    )
    ours.load_state_dict(original.state_dict())
    group = ours.param_groups[0]
    assert group["implementation"] == "foreach" and group["lr_peak"] == 1e-2
    assert (group["lr"], group["weight_decay"], group["weight_decay_mode"]) == (3e-3, 0.05, "coupled")
    assert int(ours.state[ours.param_groups[0]["params"][0]]["step"]) == K


@pytest.mark.parametrize(
    "source, target",
    [
        (lambda p: torch.optim.AdamW(p), hf_optim.Adafactor),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), hf_optim.AdamW),
        (lambda p: torch.optim.Adafactor(p), hf_optim.AdamW),
        (lambda p: hf_optim.AdamW(p), hf_optim.Adafactor),
        (lambda p: hf_optim.Adafactor(p), hf_optim.RMSProp),
        (lambda p: hf_optim.SGDW(p, momentum=0.9), hf_optim.AdaGrad),
        (lambda p: torch.optim.NAdam(p), hf_optim.Adam),
    ],
    ids=[
        "torch-adamw->adafactor",
        "torch-sgd->adamw",
        "torch-adafactor->adamw",
        "adamw->adafactor",
        "adafactor->rmsprop",
        "sgdw->adagrad",
        "torch-nadam->adam",
    ],
)
def test_incompatible_family_is_refused(source, target):
    params = _params()
    opt = source(params)
    _run(opt, params, range(2))
    ours = target(_params())
    with pytest.raises(ValueError, match="loads state dicts of"):
        ours.load_state_dict(opt.state_dict())
    assert not ours.state  # nothing was loaded


def test_amsgrad_is_refused_with_the_reason():
    params = _params()
    opt = torch.optim.Adam(params, amsgrad=True)
    _run(opt, params, range(2))
    with pytest.raises(ValueError, match="amsgrad"):
        hf_optim.Adam(_params()).load_state_dict(opt.state_dict())
