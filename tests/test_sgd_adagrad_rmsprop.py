"""SGDW, AdaGrad and RMSProp against torch.optim (where the semantics coincide) and hand-written formulas.

Every trajectory is 100 steps of a seeded gradient stream with occasional x30 spikes under a warm-up + cosine
``LambdaLR``, over shapes {64x32, 32, 8x16x4, 0-d}. References:
- ``l2`` decay: ``torch.optim.SGD`` / ``Adagrad`` / ``RMSprop`` with ``weight_decay`` (every implementation path);
- decoupled modes: :class:`HandWritten`, the update rules typed in from the docstrings' maths, itself checked
  against torch in ``l2`` mode so that it is trusted for the other modes.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR

import hf_optim

SHAPES = [(64, 32), (32,), (8, 16, 4), ()]
STEPS = 100
WARMUP = 10
TOL = {torch.float64: 1e-12, torch.float32: 1e-6}
DTYPES = [torch.float64, torch.float32]
IMPLS = ["for-loop", "foreach", "auto"]
TORCH = {"SGDW": torch.optim.SGD, "AdaGrad": torch.optim.Adagrad, "RMSProp": torch.optim.RMSprop}


def warmup_cosine(step: int) -> float:
    """Linear warm-up over WARMUP steps, then cosine from 1 down to 0.1."""
    if step < WARMUP:
        return (step + 1) / WARMUP
    progress = (step - WARMUP) / (STEPS - WARMUP)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


def _make_stream() -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    gen = torch.Generator().manual_seed(1234)
    init = [torch.randn(shape, generator=gen, dtype=torch.float64) for shape in SHAPES]
    grads = []
    for _ in range(STEPS):
        spike = 30.0 if torch.rand((), generator=gen).item() < 0.07 else 1.0
        grads.append([spike * torch.randn(shape, generator=gen, dtype=torch.float64) for shape in SHAPES])
    return init, grads


INIT, GRADS = _make_stream()


def run(build, dtype: torch.dtype, schedule=warmup_cosine, param_dtype: torch.dtype | None = None):
    """Params after the 100-step trajectory of ``build(params)``; grads and params are cast to the dtype first."""
    param_dtype = param_dtype or dtype
    params = [p.to(param_dtype).clone() for p in INIT]
    opt = build(params)
    sched = LambdaLR(opt, schedule)
    for grads in GRADS:
        for p, g in zip(params, grads):
            p.grad = g.to(param_dtype)
        opt.step()
        sched.step()
    return params, opt


def assert_same(actual, expected, dtype) -> None:
    """``|a - e| <= TOL·max(1, max|e|)`` for every element of each tensor, with ``rtol=0``.

    Absolute for tensors of magnitude <= 1; scaled by the tensor's largest magnitude above that, because the
    momentum runs grow weights to ~7 (fp32) and ~46 (fp64): an fp32 ulp at 6.7 is 4.8e-7, so a fixed 1e-6 would
    leave a budget of 2 ulps there but 8 at 1. The scale is one number per tensor (not torch's per-element
    ``rtol``), so small entries of a large tensor get no extra slack beyond it. Measured worst: 9.5e-7 (fp32,
    max|e| = 6.7) and 2.3e-14 (fp64, max|e| = 46).
    """
    for a, e in zip(actual, expected):
        scale = max(1.0, e.detach().abs().max().item()) if e.numel() else 1.0
        torch.testing.assert_close(a, e, rtol=0, atol=TOL[dtype] * scale)


class HandWritten(torch.optim.Optimizer):
    """The three update rules written out per tensor (independent of hf_optim's code); decay per ``mode``.

    ``lr_peak`` is the ``initial_lr`` that ``LambdaLR`` records, ``t`` the global step.
    """

    def __init__(self, params, kind: str, mode: str, lr: float, weight_decay: float = 0.0, maximize=False, **knobs):
        super().__init__(params, dict(lr=lr))
        self.kind, self.mode, self.wd, self.maximize, self.k = kind, mode, weight_decay, maximize, knobs
        self.t = 0

    @torch.no_grad()
    def step(self):
        self.t += 1
        t, k, wd = self.t, self.k, self.wd
        group = self.param_groups[0]
        lr, peak = group["lr"], group["initial_lr"]
        for p in group["params"]:
            s = self.state[p]
            g = -p.grad if self.maximize else p.grad.clone()
            if self.mode == "l2":
                g = g + wd * p
            eta = lr / (1 + (t - 1) * k.get("lr_decay", 0.0)) if self.kind == "AdaGrad" else lr
            rate = {"l2": 0.0, "coupled": wd * eta, "independent": wd * eta / peak, "corrected": wd * eta**2 / peak}
            p.mul_(1 - rate[self.mode])
            if self.kind == "SGDW":
                mu = k.get("momentum", 0.0)
                if mu:
                    s["b"] = g.clone() if t == 1 else mu * s["b"] + (1 - k.get("dampening", 0.0)) * g
                    g = g + mu * s["b"] if k.get("nesterov") else s["b"]
                p.sub_(eta * g)
            elif self.kind == "AdaGrad":
                s["S"] = s.get("S", torch.full_like(p, k.get("initial_accumulator_value", 0.0))) + g * g
                p.sub_(eta * g / (s["S"].sqrt() + k.get("eps", 1e-10)))
            else:
                rho, mu = k.get("alpha", 0.99), k.get("momentum", 0.0)
                s["v"] = rho * s.get("v", torch.zeros_like(p)) + (1 - rho) * g * g
                v = s["v"]
                if k.get("centered"):
                    s["m"] = rho * s.get("m", torch.zeros_like(p)) + (1 - rho) * g
                    v = v - s["m"] * s["m"]
                step = g / (v.sqrt() + k.get("eps", 1e-8))
                if mu:
                    s["b"] = mu * s.get("b", torch.zeros_like(p)) + step
                    step = s["b"]
                p.sub_(eta * step)


# (class, knobs shared by hf_optim and torch); weight decay added by the tests.
TORCH_CONFIGS = {
    "sgd-plain": ("SGDW", dict(lr=1e-2)),
    "sgd-momentum": ("SGDW", dict(lr=2e-3, momentum=0.9)),
    "sgd-dampening": ("SGDW", dict(lr=2e-3, momentum=0.8, dampening=0.3)),
    "sgd-nesterov": ("SGDW", dict(lr=2e-3, momentum=0.9, nesterov=True)),
    "sgd-nesterov-max": ("SGDW", dict(lr=2e-3, momentum=0.9, nesterov=True, maximize=True)),
    "adagrad": ("AdaGrad", dict(lr=0.1)),
    "adagrad-lrdecay-acc": ("AdaGrad", dict(lr=0.1, lr_decay=0.05, initial_accumulator_value=0.3, eps=1e-6)),
    "adagrad-max": ("AdaGrad", dict(lr=0.1, maximize=True)),
    "rmsprop": ("RMSProp", dict(lr=1e-2)),
    "rmsprop-centered": ("RMSProp", dict(lr=1e-2, centered=True, alpha=0.9)),
    "rmsprop-momentum": ("RMSProp", dict(lr=1e-3, momentum=0.9, eps=1e-6)),
    "rmsprop-centered-momentum-max": ("RMSProp", dict(lr=1e-3, momentum=0.5, centered=True, maximize=True)),
}
WD = 0.05


def _ours(cls: str, knobs: dict, **extra):
    return lambda ps: getattr(hf_optim, cls)(ps, **knobs, **extra)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(TORCH_CONFIGS))
def test_l2_equals_torch(name: str, dtype: torch.dtype) -> None:
    cls, knobs = TORCH_CONFIGS[name]
    expected, _ = run(lambda ps: TORCH[cls](ps, **knobs, weight_decay=WD), dtype)
    # SGDW's default mode is "coupled"; AdaGrad's and RMSProp's default "l2" is what torch means: test the default.
    mode = dict(weight_decay_mode="l2") if cls == "SGDW" else {}
    for impl in IMPLS:
        actual, _ = run(_ours(cls, knobs, weight_decay=WD, implementation=impl, **mode), dtype)
        assert_same(actual, expected, dtype)


@pytest.mark.parametrize(
    "name", ["sgd-dampening", "sgd-nesterov-max", "adagrad-lrdecay-acc", "rmsprop-centered-momentum-max"]
)
def test_handwritten_reference_equals_torch(name: str) -> None:
    """Trust the hand-written rules for the decoupled modes by checking them where torch is the reference."""
    cls, knobs = TORCH_CONFIGS[name]
    expected, _ = run(lambda ps: TORCH[cls](ps, **knobs, weight_decay=WD), torch.float64)
    actual, _ = run(lambda ps: HandWritten(ps, cls, "l2", weight_decay=WD, **knobs), torch.float64)
    assert_same(actual, expected, torch.float64)


DECOUPLED_CONFIGS = [
    "sgd-momentum",
    "sgd-nesterov-max",
    "adagrad-lrdecay-acc",
    "rmsprop-centered-momentum-max",
    "rmsprop",
]
DECOUPLED_WD = {"coupled": 0.1, "independent": 5e-4, "corrected": 0.5}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", list(DECOUPLED_WD))
@pytest.mark.parametrize("name", DECOUPLED_CONFIGS)
def test_decoupled_modes_equal_formula(name: str, mode: str, dtype: torch.dtype) -> None:
    cls, knobs = TORCH_CONFIGS[name]
    wd = DECOUPLED_WD[mode]
    expected, _ = run(lambda ps: HandWritten(ps, cls, mode, weight_decay=wd, **knobs), dtype)
    for impl in ["for-loop", "foreach"]:  # "auto" is checked against torch above
        actual, _ = run(_ours(cls, knobs, weight_decay=wd, weight_decay_mode=mode, implementation=impl), dtype)
        assert_same(actual, expected, dtype)
    # The decay really acts: without it the trajectory is measurably different.
    undecayed, _ = run(_ours(cls, knobs), dtype)
    assert max((a - u).abs().max().item() for a, u in zip(actual, undecayed)) > 1e-4


def test_sgdw_default_mode_is_coupled_and_equals_torch_l2_without_momentum() -> None:
    """Without momentum, x(1 - α_t λ) - α_t g == x - α_t (g + λ x): SGDW's default equals torch.optim.SGD."""
    assert hf_optim.SGDW([torch.zeros(1)]).defaults["weight_decay_mode"] == "coupled"
    expected, _ = run(lambda ps: torch.optim.SGD(ps, lr=0.05, weight_decay=WD), torch.float64)
    actual, _ = run(lambda ps: hf_optim.SGDW(ps, lr=0.05, weight_decay=WD), torch.float64)
    assert_same(actual, expected, torch.float64)
    # ... but with momentum the decay no longer passes through the buffer, so the two differ.
    l2, _ = run(lambda ps: torch.optim.SGD(ps, lr=0.02, momentum=0.9, weight_decay=WD), torch.float64)
    coupled, _ = run(lambda ps: hf_optim.SGDW(ps, lr=0.02, momentum=0.9, weight_decay=WD), torch.float64)
    assert max((a - b).abs().max().item() for a, b in zip(l2, coupled)) > 1e-3


@pytest.mark.parametrize("cls", ["SGDW", "RMSProp"])
def test_independent_equals_coupled_with_wd_over_peak_lr(cls: str) -> None:
    """Independent decay λ is coupled decay with λ/lr_peak (the same identity as torch AdamW(weight_decay=λ/lr))."""
    lr, lam = 0.02, 3e-4
    knobs = dict(lr=lr, momentum=0.9)
    expected, _ = run(_ours(cls, knobs, weight_decay=lam / lr, weight_decay_mode="coupled"), torch.float64)
    actual, _ = run(_ours(cls, knobs, weight_decay=lam, weight_decay_mode="independent"), torch.float64)
    assert_same(actual, expected, torch.float64)


@pytest.mark.parametrize("mode", ["l2", "coupled", "independent", "corrected"])
def test_adagrad_lr_decay_is_a_schedule_in_every_mode(mode: str) -> None:
    """Documented choice: decoupled decay uses η_t = α_t/(1+(t-1)δ), i.e. lr_decay acts like a scheduler factor."""
    delta, wd = 0.05, DECOUPLED_WD.get(mode, WD)

    def with_factor(step: int) -> float:  # LambdaLR's step k sets the lr of optimizer step t = k + 1
        return warmup_cosine(step) / (1 + step * delta)

    decay = dict(weight_decay=wd, weight_decay_mode=mode)
    expected, _ = run(_ours("AdaGrad", dict(lr=0.1), **decay), torch.float64, with_factor)
    actual, _ = run(_ours("AdaGrad", dict(lr=0.1, lr_decay=delta), **decay), torch.float64)
    assert_same(actual, expected, torch.float64)


@pytest.mark.parametrize("name", ["sgd-nesterov", "adagrad-lrdecay-acc", "rmsprop-centered-momentum-max"])
def test_bf16_params_use_fp32_maths_and_round_to_nearest(name: str) -> None:
    """A bf16 run == torch on fp32 copies whose params (and grads) are rounded to bf16 after every step."""
    cls, knobs = TORCH_CONFIGS[name]
    build = _ours(cls, knobs, weight_decay=WD, weight_decay_mode="l2")
    ours, opt = run(build, torch.float32, param_dtype=torch.bfloat16)
    for state in opt.state.values():
        for key, value in state.items():
            assert value.dtype == torch.float32, key

    params = [p.bfloat16().float() for p in INIT]
    opt = TORCH[cls](params, **knobs, weight_decay=WD)
    sched = LambdaLR(opt, warmup_cosine)
    for grads in GRADS:
        for p, g in zip(params, grads):
            p.grad = g.bfloat16().float()
        opt.step()
        sched.step()
        with torch.no_grad():
            for p in params:
                p.copy_(p.bfloat16().float())
    for a, e in zip(ours, params):
        assert a.dtype == torch.bfloat16
        assert torch.equal(a.float(), e)


@pytest.mark.parametrize(
    "cls, knobs, keys",
    [
        ("SGDW", dict(momentum=0.9), {"momentum_buffer"}),
        ("SGDW", dict(), set()),
        ("AdaGrad", dict(), {"sum", "step"}),
        ("RMSProp", dict(), {"square_avg", "step"}),
        ("RMSProp", dict(centered=True, momentum=0.5), {"square_avg", "grad_avg", "momentum_buffer", "step"}),
    ],
)
def test_state_keys_and_grads_untouched(cls: str, knobs: dict, keys: set) -> None:
    p = torch.randn(5, 3)
    g = torch.randn(5, 3)
    p.grad = g.clone()
    opt = getattr(hf_optim, cls)([p], lr=0.1, maximize=True, weight_decay=0.1, weight_decay_mode="l2", **knobs)
    opt.step()
    opt.step()
    assert set(opt.state[p]) == keys
    if "step" in keys:
        assert opt.state[p]["step"].dtype == torch.float32 and opt.state[p]["step"].item() == 2.0
    assert torch.equal(p.grad, g)  # maximize / l2 / nesterov build new tensors instead of writing into p.grad


@pytest.mark.parametrize(
    "cls, kwargs, name",
    [
        ("SGDW", dict(momentum=-0.1), "momentum"),
        ("SGDW", dict(momentum=0.9, dampening=1.5), "dampening"),
        ("SGDW", dict(momentum=0.9, dampening=-0.1), "dampening"),
        ("SGDW", dict(nesterov=True), "nesterov"),
        ("SGDW", dict(momentum=0.9, dampening=0.1, nesterov=True), "nesterov"),
        ("AdaGrad", dict(lr_decay=-1.0), "lr_decay"),
        ("AdaGrad", dict(initial_accumulator_value=-0.1), "initial_accumulator_value"),
        ("AdaGrad", dict(eps=-1e-10), "eps"),
        ("RMSProp", dict(alpha=1.0), "alpha"),
        ("RMSProp", dict(alpha=-0.1), "alpha"),
        ("RMSProp", dict(momentum=-0.5), "momentum"),
        ("RMSProp", dict(eps=-1.0), "eps"),
        ("RMSProp", dict(alpha=0.0, centered=True), "alpha=0 with centered=True"),
        ("RMSProp", dict(weight_decay_mode="decoupled"), "weight_decay_mode"),
    ],
)
def test_bad_knobs_raise_value_error_naming_them(cls: str, kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        getattr(hf_optim, cls)([torch.zeros(2)], **kwargs)
    # Per-group values are checked as well.
    opt = getattr(hf_optim, cls)([torch.zeros(2)])
    with pytest.raises(ValueError, match=name):
        opt.add_param_group({"params": [torch.zeros(2)], **kwargs})


@pytest.mark.parametrize("cls, kwargs", [("SGDW", dict(nesterov=1)), ("RMSProp", dict(centered="yes"))])
def test_non_bool_flags_raise_type_error(cls: str, kwargs: dict) -> None:
    with pytest.raises(TypeError, match=next(iter(kwargs))):
        getattr(hf_optim, cls)([torch.zeros(2)], momentum=0.9, **kwargs)


@pytest.mark.parametrize("name", ["sgd-nesterov", "adagrad-lrdecay-acc", "rmsprop-centered-momentum-max"])
def test_bf16_state_dict_round_trip_keeps_fp32_state(name: str, tmp_path) -> None:
    """torch's load_state_dict would cast the fp32 state of a bf16 param to bf16; ours keeps it, bit for bit."""
    cls, knobs = TORCH_CONFIGS[name]

    def make(ps):
        return getattr(hf_optim, cls)(ps, **knobs, weight_decay=WD)

    def feed(params, opt, grads) -> None:
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.bfloat16()
            opt.step()

    straight = [p.bfloat16() for p in INIT]
    opt = make(straight)
    feed(straight, opt, GRADS[:40])

    resumed = [p.bfloat16() for p in INIT]
    first = make(resumed)
    feed(resumed, first, GRADS[:20])
    torch.save(first.state_dict(), tmp_path / "opt.pt")
    second = make(resumed)
    second.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    for p in resumed:
        for key, value in first.state[p].items():
            assert value.dtype == torch.float32 and torch.equal(second.state[p][key], value), key
    feed(resumed, second, GRADS[20:40])
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)
    for p, q in zip(straight, resumed):
        for key, value in opt.state[p].items():
            assert torch.equal(second.state[q][key], value), key


def test_auto_picks_foreach_for_plain_float_tensors_only() -> None:
    from hf_optim.optim.elementwise import choose_implementation

    class Tagged(torch.Tensor):  # tensor subclasses (e.g. DTensor) go through the for-loop path
        pass

    assert choose_implementation("auto", [torch.zeros(2), torch.zeros(2, dtype=torch.bfloat16)]) == "foreach"
    assert choose_implementation("auto", [torch.zeros(2).as_subclass(Tagged)]) == "for-loop"
    assert choose_implementation("for-loop", [torch.zeros(2)]) == "for-loop"
