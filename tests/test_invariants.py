"""Generic invariants, run over every row of the central table ``tests/optimizer_cases.CASES``.

Which bad-argument checks apply to a row is derived from its class' constructor signature (and, for Adafactor, which
takes ``**knobs``, from its ``KNOBS`` table), so a new optimizer gets every applicable check by adding one row.
bf16 parameters are checked bit for bit against fp32 maths on an fp32 master copy re-rounded after every step.
"""

from __future__ import annotations

import inspect
import io
import math
import warnings

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
    # state-dict ids follow the groups' order (an optimizer that splits groups, Muon, reorders the parameters)
    for index, p in enumerate(p for group in opt.param_groups for p in group["params"]):
        for key, value in saved_state.get(index, {}).items():
            if torch.is_tensor(value) and key != "step":
                assert opt.state[p][key].dtype == value.dtype, (key, opt.state[p][key].dtype, value.dtype)
    train(opt, fresh, range(4, 8), lrs)
    for a, b in zip(fresh, reference):
        assert torch.equal(a.detach(), b.detach())


def expected_state_dtype(opt, p: torch.Tensor, key: str) -> torch.dtype:
    """fp32 for every state tensor of a bf16 parameter, except a momentum the user asked to keep in bf16
    (Adafactor ``momentum_dtype="bfloat16"``, the adafactor_v2 default), which is bf16 whatever the parameter."""
    group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
    if group.get("state_dtype") == "bfloat16" and key != "step" and opt.state[p][key].shape == p.shape:
        return torch.bfloat16  # stored in bf16 between steps (state_dtype), whatever the parameter
    if key == "exp_avg" and group.get("momentum_dtype") == "bfloat16":
        return torch.bfloat16
    return torch.float32


def fp32_master_reference(case: Case, bf16_params, steps: range, lrs: list[float], *, reround: bool, impl: str):
    """fp32 maths on fp32 master copies of the (initial) bf16 parameters, fed the same bf16 gradients, re-rounded to
    bf16 (round to nearest even) after every step when ``reround``. Returns the masters."""
    masters = [p.detach().float().requires_grad_(True) for p in bf16_params]
    overrides = {}
    if case.cls_name == "Adafactor" and case.build(masters).param_groups[0]["eps1"] is None:
        # eps1=None means the machine epsilon of the *parameter* dtype (torch.optim.Adafactor's rule): bf16's.
        overrides["eps1"] = torch.finfo(torch.bfloat16).eps
    opt = case.build(masters, implementation=impl, **overrides)
    for step in steps:
        for group, base in zip(opt.param_groups, lrs):
            group["lr"] = base * lr_at(step)
        for m, g in zip(masters, grads_for(bf16_params, step)):  # bf16 gradients, exactly representable in fp32
            m.grad = g.float()
        opt.step()
        if reround:
            with torch.no_grad():
                for m in masters:
                    m.copy_(m.bfloat16().float())
    return masters


@pytest.mark.parametrize("impl", ["for-loop", "auto"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_bf16_params_use_fp32_maths_and_state_and_round_to_nearest(case: Case, impl: str):
    """A bf16 run == fp32 maths on an fp32 master copy rounded to bf16 after each step, bit for bit.

    Bitwise equality is what a bf16-maths implementation (or bf16 state) fails: its rounding errors differ in the
    low bits after the first step. The check that an un-rounded fp32 master ends elsewhere makes sure the rounding
    is really exercised, so an implementation that kept hidden fp32 master weights would fail too.
    """
    steps = range(10)
    params = make_params(torch.bfloat16)
    initial = [p.detach().clone() for p in params]
    opt = case.build(params, implementation=impl)
    lrs = base_lrs(opt)
    train(opt, params, steps, lrs)
    for p in params:
        assert p.dtype == torch.bfloat16
        for key, value in opt.state[p].items():
            if torch.is_tensor(value) and value.is_floating_point():
                assert value.dtype == expected_state_dtype(opt, p, key), (key, value.dtype)

    # Adafactor's auto sends bf16 tensors to the eager for-loop (its C kernel is fp32-only): compare like with like.
    ref_impl = "for-loop" if case.cls_name == "Adafactor" else impl
    reference = fp32_master_reference(case, initial, steps, lrs, reround=True, impl=ref_impl)
    for p, m in zip(params, reference):
        assert torch.equal(p.detach().float(), m.detach()), (p.shape, (p.detach().float() - m).abs().max())
    unrounded = fp32_master_reference(case, initial, steps, lrs, reround=False, impl=ref_impl)
    assert any(not torch.equal(p.detach().float(), u.detach()) for p, u in zip(params, unrounded))


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


#: argument or knob name -> values that must be rejected with a ValueError naming it. Applied to every row whose
#: class takes the name (constructor signature, or Adafactor's knob table), so a new optimizer or knob gets the
#: checks by name; test_every_constrained_argument_has_bad_values keeps the table complete.
BAD_VALUES: dict[str, list[object]] = {
    "lr": [-1e-3, float("inf")],
    "weight_decay": [-0.1, float("nan")],
    "weight_decay_mode": ["no-such-mode"],
    "implementation": ["no-such-mode"],
    "eps_mode": ["no-such-mode"],
    "preset": ["no-such-mode"],
    "eps": [-1e-8],
    "betas": [(1.0, 0.999), (0.9, -0.1), (0.9, 1.5), (0.9,)],
    "a": [0.0, -1.0],
    "b": [-0.5],
    "momentum": [-0.1],
    "dampening": [-0.1, 1.5],
    "alpha": [1.0, -0.1],
    "lr_decay": [-1.0],
    "initial_accumulator_value": [-0.1],
    # Adafactor knobs
    "eps1": [-1e-30, 0.0],  # 0 would divide 0 by 0 on an all-zero gradient row
    "eps2": [-1e-3],
    "beta1": [1.0, -0.5],
    "beta2_cap": [0.0, 1.5, -0.1],
    "decay_rate": [0.0, -0.8],
    "rho_max": [0.0, -1.0],
    "min_dim_size_to_factor": [0, -3],
    "clip_threshold": [0.0, -1.0],
    "factor_dims": ["no-such-mode"],
    "momentum_dtype": ["float16"],
    "eps1_mode": ["no-such-mode"],
    "relative_step_lr": ["no-such-mode"],
    "weight_decay_lr": ["no-such-mode"],
    # Muon knobs
    "adjust": ["no-such-mode"],
    "orthogonalize": ["no-such-mode"],
    "ns_dtype": ["float16"],
    "ns_steps": [0, 100, 2.5],
    "ns_coefficients": [(1.0, 2.0), (0.0, 0.0, 2.0)],
    "fallback": ["no-such-optimizer", "muon_v2"],
    "fallback_lr": [0.0, -1.0],
    "fallback_betas": [(1.0, 0.9)],
    "fallback_eps": [-1.0],
    "rule": ["no-such-rule"],
    "qk_clip": [0.0, -1.0],
    # the stored form of state (every optimizer)
    "state_dtype": ["float16", "int3"],
    "state_block_size": [1, 0, 2.5],
    "state_min_numel": [0, -1],
    "param_update": ["fp32_master"],
}
#: Names with no invalid value of the right type: the parameters themselves, and booleans (a non-bool is a
#: TypeError, test_non_bool_flag_is_a_type_error).
UNCONSTRAINED = {"self", "params", "param_overrides"}


def argument_names(cls: type) -> list[str]:
    """The constructor's named arguments plus, for a class taking ``**knobs`` (Adafactor), its module's KNOBS."""
    names = []
    for name, param in inspect.signature(cls.__init__).parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            names += list(getattr(inspect.getmodule(cls), "KNOBS", ()))
        else:
            names.append(name)
    return list(dict.fromkeys(names))


def bool_arguments(case: Case) -> set[str]:
    """Names whose value in a freshly built optimizer is a bool."""
    opt = case.build([torch.zeros(2, requires_grad=True)])
    return {k for k, value in opt.defaults.items() if isinstance(value, bool)}


def bad_arguments(case: Case) -> list[tuple[str, object]]:
    """``(argument, bad value)`` pairs that apply to the case's class."""
    return [(name, value) for name in argument_names(case.cls) for value in BAD_VALUES.get(name, [])]


BAD_ARGS = [
    pytest.param(case, name, value, id=f"{case.id}-{name}={value!r}")
    for case in CASES
    for name, value in (bad_arguments(case) if case.available else [("lr", -1e-3)])
]


@pytest.mark.parametrize(("case", "name", "value"), BAD_ARGS)
def test_invalid_hyperparameter_is_a_value_error_naming_it(case: Case, name: str, value: object):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        case.build([torch.zeros(2, requires_grad=True)], **{name: value})


@pytest.mark.parametrize("cls_name", sorted({case.cls_name for case in CASES}))
def test_every_constrained_argument_has_bad_values(cls_name: str):
    """Every constructor argument / knob is in BAD_VALUES, a bool flag, or a parameter container."""
    case = next(c for c in CASES if c.cls_name == cls_name)
    missing = set(argument_names(case.cls)) - set(BAD_VALUES) - bool_arguments(case) - UNCONSTRAINED
    assert not missing, f"{cls_name}: add bad values for {sorted(missing)} to BAD_VALUES"


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_non_bool_flag_is_a_type_error(case: Case):
    for name in sorted(bool_arguments(case)):
        with pytest.raises(TypeError, match=name):
            case.build([torch.zeros(2, requires_grad=True)], **{name: 1})


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_rejected_param_group_is_not_kept(case: Case):
    """add_param_group with a bad value raises and leaves the optimizer as it was: the bad group is not stepped,
    and its parameter can be added again with good values."""
    params = make_params()
    opt = case.build(params[:2])
    groups = len(opt.param_groups)  # 1, or 2 where the class splits matrices from vectors (Muon)
    extra = params[2]
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": [extra], "lr": -1.0})
    assert len(opt.param_groups) == groups and all(p is not extra for g in opt.param_groups for p in g["params"])
    before = extra.detach().clone()
    for p, g in zip(params, grads_for(params, 0)):
        p.grad = g
    opt.step()  # a kept bad group would step with lr = -1 (or fail in the kernels)
    assert torch.equal(extra.detach(), before)
    opt.add_param_group({"params": [extra]})  # torch would refuse a parameter already in a (kept) group
    opt.step()
    assert not torch.equal(extra.detach(), before)


@pytest.mark.parametrize("mode", ["independent", "corrected"])
@pytest.mark.parametrize("cls_name", sorted({case.cls_name for case in CASES}))
def test_zero_peak_lr_with_schedule_relative_decay_warns(cls_name: str, mode: str):
    """independent/corrected decay divide by lr_peak: with lr_peak = 0 the decay is off, which must not be silent."""
    case = next(c for c in CASES if c.cls_name == cls_name)
    with pytest.warns(UserWarning, match="lr_peak"):
        case.build([torch.zeros(2, requires_grad=True)], lr=0.0, weight_decay=1e-4, weight_decay_mode=mode)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # λ = 0, or a mode that does not divide by the peak: nothing to say
        case.build([torch.zeros(2, requires_grad=True)], lr=0.0, weight_decay=0.0, weight_decay_mode=mode)
        case.build(
            [torch.zeros(2, requires_grad=True)],
            lr=0.0,
            weight_decay=1e-4,
            weight_decay_mode="coupled",
            **({"relative_step": False} if cls_name == "Adafactor" else {}),
        )


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_non_numeric_lr_is_a_type_error(case: Case):
    with pytest.raises(TypeError, match="lr"):
        case.build([torch.zeros(2, requires_grad=True)], lr="0.01")


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_every_implementation_equals_for_loop(case: Case):
    impls = [
        impl for impl in case.cls.implementations if impl not in ("for-loop", "compiled")
    ]  # compiled: test_compiled.py
    assert "for-loop" in case.cls.implementations
    results = {}
    for impl in ["for-loop", *impls, "auto"]:
        params = make_params(shapes=[(6, 4), (5,), (2, 3, 2), (), (0, 2)])
        opt = case.build(params, implementation=impl)
        train(opt, params, range(12), base_lrs(opt))
        results[impl] = [p.detach() for p in params]
    for impl, result in results.items():
        for a, b in zip(result, results["for-loop"]):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=lambda m, impl=impl: f"{impl}: {m}")


ADAFACTOR_CASES = [case for case in CASES if case.cls_name == "Adafactor"]


@pytest.mark.parametrize("case", ADAFACTOR_CASES, ids=[case.id for case in ADAFACTOR_CASES])
def test_adafactor_rows_factor_their_matrices(case: Case):
    """The table's matrices (6x4, 2x3x2) are factored wherever the preset factors, so the invariants above (bf16
    state_dict round trip included) cover row/column statistics, not only the unfactored fallback."""
    params = make_params()
    opt = case.build(params)
    train(opt, params, range(1), base_lrs(opt))
    for p in params:
        keys = set(opt.state[p])
        if opt.param_groups[0]["factored"] and p.ndim >= 2:
            assert {"exp_avg_sq_row", "exp_avg_sq_col"} <= keys and "exp_avg_sq" not in keys, (p.shape, keys)
        else:
            assert "exp_avg_sq" in keys and "exp_avg_sq_row" not in keys, (p.shape, keys)
    assert any(g["factored"] for g in opt.param_groups) == (case.kwargs["preset"] != "palm")
