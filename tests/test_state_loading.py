"""load_state_dict checks every state tensor against its parameter before anything runs, on every implementation.

Before the checks, state saved with the groups in another order loaded silently and the first step wrote out of
bounds (``free(): invalid next size`` from the C Adafactor kernel, ``corrupted size vs. prev_size`` from the fused
AdamW path) or ran on transposed statistics. Every case here must raise ``ValueError`` at load time and leave the
optimizer as it was (it still steps).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import hf_optim

#: class name -> extra constructor kwargs (Adafactor: factor small matrices, so the C kernel takes them).
CLASSES = {
    "Adam": {},
    "AdamW": {},
    "AdamAtan2": {},
    "RAdam": {},
    "SGDW": {"momentum": 0.9},
    "AdaGrad": {},
    "RMSProp": {"momentum": 0.5, "centered": True},
    "Adafactor": {"min_dim_size_to_factor": 1},
    "Adafactor-palm": {"preset": "palm"},
}
ROWS = [
    (name, impl)
    for name, kwargs in CLASSES.items()
    for impl in ("auto", *getattr(hf_optim, name.split("-")[0]).implementations)
]


def _build(name: str, params, implementation: str):
    cls = getattr(hf_optim, name.split("-")[0])
    return cls(params, implementation=implementation, **CLASSES[name])


def _stepped(name: str, groups, implementation: str):
    # The state's shapes do not depend on the path; compiling here would cost seconds per case for nothing.
    opt = _build(name, groups, "for-loop" if implementation == "compiled" else implementation)
    for _ in range(2):
        for group in groups:
            for p in group["params"]:
                p.grad = torch.randn_like(p)
        opt.step()
    return opt


def _param(*shape):
    return torch.nn.Parameter(torch.randn(*shape))


def _assert_refused_and_intact(opt, saved, *patterns):
    before = copy.deepcopy(opt.param_groups[0]["lr"])
    with pytest.raises(ValueError) as info:
        opt.load_state_dict(saved)
    for pattern in patterns:
        assert pattern in str(info.value), str(info.value)
    assert not opt.state and opt.param_groups[0]["lr"] == before  # nothing was loaded
    for group in opt.param_groups:  # and the optimizer still steps (eagerly: compiling here costs seconds a case)
        group["implementation"] = "for-loop" if group["implementation"] == "compiled" else group["implementation"]
        for p in group["params"]:
            p.grad = torch.randn_like(p)
    opt.step()
    assert all(torch.isfinite(p).all() for g in opt.param_groups for p in g["params"])
    return str(info.value)


@pytest.mark.parametrize("name, implementation", ROWS)
def test_groups_in_another_order_are_refused(name, implementation):
    a, b = _param(8, 4), _param(4, 8)
    c, d = _param(8), _param(4)
    source = _stepped(name, [{"params": [a, c]}, {"params": [b, d]}], implementation)
    target = _build(name, [{"params": [b, d]}, {"params": [a, c]}], implementation)
    message = _assert_refused_and_intact(
        target, source.state_dict(), "param_groups[0] parameter 0", "parameter of shape (4, 8)"
    )
    assert "another order" in message


@pytest.mark.parametrize("name, implementation", ROWS)
def test_transposed_state_of_equal_size_is_refused(name, implementation):
    source = _stepped(name, [{"params": [_param(8, 4)]}], implementation)
    target = _build(name, [_param(4, 8)], implementation)
    _assert_refused_and_intact(target, source.state_dict(), "param_groups[0] parameter 0", "another model")


@pytest.mark.parametrize("name, implementation", ROWS)
def test_state_of_another_model_is_refused(name, implementation):
    source = _stepped(name, [{"params": [_param(16, 4), _param(4)]}], implementation)
    target = _build(name, [_param(8, 4), _param(4)], implementation)
    _assert_refused_and_intact(target, source.state_dict(), "param_groups[0] parameter 0", "has shape (16,")


@pytest.mark.parametrize("name", list(CLASSES))
def test_round_trip_still_loads_and_continues(name):
    """The checks accept what the class itself saved: save, load, continue == uninterrupted."""
    torch.manual_seed(0)
    params = [_param(8, 4), _param(4)]
    opt = _stepped(name, [{"params": params}], "auto")
    saved = copy.deepcopy(opt.state_dict())
    clone = [torch.nn.Parameter(p.detach().clone()) for p in params]
    other = _build(name, clone, "auto")
    other.load_state_dict(saved)
    for p, q in zip(params, clone):
        p.grad = torch.ones_like(p)
        q.grad = torch.ones_like(q)
    opt.step()
    other.step()
    for p, q in zip(params, clone):
        assert torch.equal(p, q)


def _adamw_saved():
    p = _param(3, 2)
    opt = _stepped("AdamW", [{"params": [p]}], "for-loop")
    return p, copy.deepcopy(opt.state_dict())


@pytest.mark.parametrize(
    "mutate, pattern",
    [
        (lambda s: s["state"][0].__setitem__("exp_avg", torch.zeros(2, 3)), "shape (2, 3), expected (3, 2)"),
        (lambda s: s["state"][0].__setitem__("exp_avg", torch.zeros(6)), "shape (6,)"),
        (lambda s: s["state"][0].__setitem__("momentum_buffer", torch.zeros(3, 2)), "'momentum_buffer' is not kept"),
        (lambda s: s["state"][0].__setitem__("exp_avg", torch.zeros(3, 2, dtype=torch.complex64)), "dtype"),
        (lambda s: s["state"][0].__setitem__("exp_avg", torch.zeros(3, 2, dtype=torch.int64)), "dtype"),
        (lambda s: s["state"][0].__setitem__("exp_avg", [0.0] * 6), "must be a tensor"),
        (lambda s: s["state"][0].__setitem__("step", torch.tensor(-1.0)), "'step'"),
        (lambda s: s["state"][0].__setitem__("step", math.nan), "'step'"),
        (lambda s: s["state"][0].__setitem__("step", torch.ones(2)), "'step'"),
        (lambda s: s["state"].__setitem__(0, [1, 2]), "dict of state values"),
        (lambda s: s["param_groups"][0].__setitem__("betas", (1.5, 0.9)), "betas"),
        (lambda s: s["param_groups"][0].__setitem__("implementation", "compiled"), "implementation"),
        (lambda s: s["param_groups"].append(dict(s["param_groups"][0])), "2 parameter group(s)"),
        (lambda s: s["param_groups"][0].__setitem__("params", [0, 0]), "parameter(s)"),
        (lambda s: s.pop("state"), "'state' and 'param_groups'"),
        (lambda s: s["state"][0].pop("exp_avg_sq"), "lacks ['exp_avg_sq']"),
    ],
    ids=[
        "transposed",
        "flat",
        "unknown-key",
        "complex",
        "int",
        "list",
        "negative-step",
        "nan-step",
        "vector-step",
        "entry-not-dict",
        "bad-knob",
        "unsupported-implementation",
        "extra-group",
        "param-count",
        "no-state",
        "partial-state",
    ],
)
def test_malformed_state_dicts_raise_value_error(mutate, pattern):
    p, saved = _adamw_saved()
    mutate(saved)
    opt = hf_optim.AdamW([torch.nn.Parameter(p.detach().clone())])
    with pytest.raises(ValueError, match=None) as info:
        opt.load_state_dict(saved)
    assert pattern in str(info.value), str(info.value)
    assert not opt.state


def test_knobs_missing_from_a_saved_group_keep_the_live_values():
    """An hf-optim state dict from a version without a knob: the live optimizer's value fills it."""
    p, saved = _adamw_saved()
    del saved["param_groups"][0]["implementation"]
    del saved["param_groups"][0]["eps_mode"]
    opt = hf_optim.AdamW([torch.nn.Parameter(p.detach().clone())], implementation="foreach", eps_mode="tf")
    opt.load_state_dict(saved)
    assert opt.param_groups[0]["implementation"] == "foreach" and opt.param_groups[0]["eps_mode"] == "tf"
    opt.param_groups[0]["params"][0].grad = torch.ones(3, 2)
    opt.step()


def test_caller_state_dict_is_not_modified():
    p = _param(6, 5)
    source = torch.optim.Adafactor([p])
    p.grad = torch.randn_like(p)
    source.step()
    saved = source.state_dict()
    keys = set(saved["state"][0])
    hf_optim.Adafactor([torch.nn.Parameter(p.detach().clone())]).load_state_dict(saved)
    assert set(saved["state"][0]) == keys and "row_var" in keys


@pytest.mark.parametrize("implementation", ["for-loop", "foreach", "fused"])
def test_moments_saved_in_another_float_dtype_are_cast_to_the_class_dtype(implementation):
    """A compatible dtype (bf16 or fp64 moments for an fp32 parameter) loads, and the fused kernels, which need one
    dtype per call, get the moments in the parameter's dtype; the step counter becomes float32."""
    p, saved = _adamw_saved()
    saved["state"][0]["exp_avg"] = saved["state"][0]["exp_avg"].to(torch.bfloat16)
    saved["state"][0]["exp_avg_sq"] = saved["state"][0]["exp_avg_sq"].double()
    saved["state"][0]["step"] = 2
    q = torch.nn.Parameter(p.detach().clone())
    opt = hf_optim.AdamW([q], implementation=implementation)
    opt.load_state_dict(saved)
    state = opt.state[q]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
    assert state["step"].dtype == torch.float32 and int(state["step"]) == 2
    q.grad = torch.ones_like(q)
    opt.step()
    assert torch.isfinite(q).all() and int(state["step"]) == 3
