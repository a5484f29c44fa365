"""Generic invariants, run over every row of the central table ``tests/optimizer_cases.CASES``.

Which bad-argument checks apply to a row is derived from its class' constructor signature, so a new optimizer gets
every applicable check by adding one row.
"""

from __future__ import annotations

import inspect
import io
import math

import pytest
import torch

from optimizer_cases import CASE_IDS, CASES, Case

SHAPES = [(6, 4), (5,), (2, 3, 2), ()]


def make_params(dtype=torch.float32, shapes=SHAPES, seed=0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(dtype).requires_grad_(True) for s in shapes]


def grads_for(params, step: int, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    return [torch.randn(p.shape, generator=gen).to(p.dtype) for p in params]


def lr_at(step: int) -> float:
    """A warm-up/decay factor applied to every group's lr, so the runs exercise a changing schedule."""
    return min(1.0, (step + 1) / 3) * 0.5 * (1 + math.cos(math.pi * step / 20))


def train(opt, params, steps: range, base_lrs: list[float]) -> None:
    for step in steps:
        for group, base in zip(opt.param_groups, base_lrs):
            group["lr"] = base * lr_at(step)
        for p, g in zip(params, grads_for(params, step)):
            p.grad = g
        opt.step()


def base_lrs(opt) -> list[float]:
    return [g["lr"] for g in opt.param_groups]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_params_without_grad_are_untouched_and_get_no_state(case: Case):
    params = make_params()
    frozen = params[1]
    before = frozen.detach().clone()
    opt = case.build(params)
    for step in range(3):
        for p, g in zip(params, grads_for(params, step)):
            p.grad = None if p is frozen else g
        opt.step()
    assert torch.equal(frozen.detach(), before)
    assert not opt.state.get(frozen)
    assert not torch.equal(params[0].detach(), make_params()[0].detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_state_dict_round_trip_continues_bitwise(case: Case, dtype: torch.dtype):
    """Save mid-run, load into a fresh optimizer, continue == uninterrupted; bf16 parameters keep their fp32 state."""
    reference = make_params(dtype)
    opt = case.build(reference)
    lrs = base_lrs(opt)
    train(opt, reference, range(8), lrs)

    resumed = make_params(dtype)
    opt = case.build(resumed)
    train(opt, resumed, range(4), lrs)
    buffer = io.BytesIO()
    torch.save({"optimizer": opt.state_dict(), "params": [p.detach() for p in resumed]}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    fresh = [p.clone().requires_grad_(True) for p in checkpoint["params"]]
    opt = case.build(fresh)
    opt.load_state_dict(checkpoint["optimizer"])
    saved_state = checkpoint["optimizer"]["state"]
    for index, p in enumerate(fresh):
        for key, value in saved_state.get(index, {}).items():
            if torch.is_tensor(value) and key != "step":
                assert opt.state[p][key].dtype == value.dtype, (key, opt.state[p][key].dtype, value.dtype)
    train(opt, fresh, range(4, 8), lrs)
    for a, b in zip(fresh, reference):
        assert torch.equal(a.detach(), b.detach())


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_bf16_params_train_close_to_fp32(case: Case):
    results = {}
    for dtype in (torch.bfloat16, torch.float32):
        params = make_params(dtype)
        opt = case.build(params)
        train(opt, params, range(10), base_lrs(opt))
        results[dtype] = [p.detach().float() for p in params]
    start = make_params()
    for low, full, p0 in zip(results[torch.bfloat16], results[torch.float32], start):
        assert torch.isfinite(low).all()
        moved = (full - p0.detach()).abs().max()
        # bf16 rounding (≈ 4e-3 relative per write) may lose some of the movement, but not most of it.
        assert (low - full).abs().max() <= 0.5 * moved + 2e-2
        if moved > 3e-2:  # a movement bf16 can resolve (its ulp is 1.6e-2 at 2..4) must show up
            assert not torch.equal(low, p0.detach().to(torch.bfloat16).float())


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_zero_size_and_zero_dim_params(case: Case):
    params = make_params(shapes=[(0, 3), (), (0,), (4,)])
    opt = case.build(params)
    train(opt, params, range(4), base_lrs(opt))
    assert params[0].shape == (0, 3) and params[2].shape == (0,)
    assert torch.isfinite(params[1]).all() and torch.isfinite(params[3]).all()
    assert not torch.equal(params[1].detach(), make_params(shapes=[(0, 3), ()])[1].detach())


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_sparse_gradient_is_a_clear_error(case: Case):
    p = torch.randn(5, 3, requires_grad=True)
    opt = case.build([p])
    p.grad = torch.randn(5, 3).to_sparse()
    with pytest.raises(ValueError, match="sparse"):
        opt.step()


def bad_arguments(case: Case) -> list[tuple[str, object]]:
    """``(argument, bad value)`` pairs that apply to the case's class, derived from its constructor signature."""
    signature = inspect.signature(case.cls.__init__).parameters
    bad: list[tuple[str, object]] = [("lr", -1e-3)]
    for name, param in signature.items():
        default = param.default
        if name in ("weight_decay_mode", "implementation", "eps_mode", "preset"):
            bad.append((name, "no-such-mode"))
        elif name == "weight_decay":
            bad.append((name, -0.1))
        elif name.startswith("eps") and isinstance(default, (int, float)) and not isinstance(default, bool):
            bad.append((name, -1e-8))
        elif name.startswith("eps") and isinstance(default, tuple):
            bad.append((name, tuple(-1e-8 for _ in default)))
        elif name == "betas":
            bad += [(name, (1.0, 0.999)), (name, (0.9, -0.1)), (name, (0.9, 1.5))]
        elif name in ("beta1", "beta2") and isinstance(default, float):
            bad += [(name, 1.0), (name, -0.5)]
    return bad


BAD_ARGS = [
    pytest.param(case, name, value, id=f"{case.id}-{name}={value!r}")
    for case in CASES
    for name, value in (bad_arguments(case) if case.available else [("lr", -1e-3)])
]


@pytest.mark.parametrize(("case", "name", "value"), BAD_ARGS)
def test_invalid_hyperparameter_is_a_value_error_naming_it(case: Case, name: str, value: object):
    with pytest.raises(ValueError, match=name):
        case.build([torch.zeros(2, requires_grad=True)], **{name: value})


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_non_numeric_lr_is_a_type_error(case: Case):
    with pytest.raises(TypeError, match="lr"):
        case.build([torch.zeros(2, requires_grad=True)], lr="0.01")


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_every_implementation_equals_for_loop(case: Case):
    impls = [impl for impl in case.cls.implementations if impl not in ("for-loop", "compiled")]  # compiled: test_compiled.py
    assert "for-loop" in case.cls.implementations
    results = {}
    for impl in ["for-loop", *impls, "auto"]:
        params = make_params(shapes=[(6, 4), (5,), (2, 3, 2), (), (0, 2)])
        opt = case.build(params, implementation=impl)
        train(opt, params, range(12), base_lrs(opt))
        results[impl] = [p.detach() for p in params]
    for impl, result in results.items():
        for a, b in zip(result, results["for-loop"]):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=lambda m: f"{impl}: {m}")
