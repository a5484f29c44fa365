"""Adam family equivalence: every mode and every implementation against torch.optim or a hand-written formula.

100 steps of seeded random gradients (with occasional x30 spikes) under a warm-up + cosine ``LambdaLR``, on shapes
{64x32, 32, 8x16x4, 0-d}; float64 within 1e-12, float32 within 1e-6.
"""

from __future__ import annotations

import functools
import math
import warnings

import pytest
import torch

import hf_optim

SHAPES = [(64, 32), (32,), (8, 16, 4), ()]
STEPS = 100
LR = 1e-2
TOL = {torch.float64: 1e-12, torch.float32: 1e-6}
DTYPES = [torch.float64, torch.float32]
OURS = ["for-loop", "foreach", "fused"]


def lr_lambda(step: int) -> float:
    """Linear warm-up over 10 steps, then cosine down to 10% of the peak."""
    if step < 10:
        return (step + 1) / 10
    progress = (step - 10) / (STEPS - 10)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


@functools.cache
def initial_params(dtype: torch.dtype) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) for shape in SHAPES]


@functools.cache
def gradient_stream(dtype: torch.dtype, steps: int = STEPS) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(2)
    stream = []
    for _ in range(steps):
        grads = []
        for shape in SHAPES:
            g = torch.randn(shape, generator=gen, dtype=torch.float64)
            if torch.rand((), generator=gen) < 0.05:  # occasional spike
                g = g * 30
            grads.append(g.to(dtype))
        stream.append(grads)
    return stream


def run(factory, dtype: torch.dtype, steps: int = STEPS, trajectory: bool = False):
    """Train with ``factory(params)`` on the shared stream; return final params (or the whole trajectory)."""
    params = [p.clone().requires_grad_(True) for p in initial_params(dtype)]
    opt = factory(params)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    history = []
    for grads in gradient_stream(dtype, steps):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        sched.step()
        if trajectory:
            history.append([p.detach().clone() for p in params])
    return history if trajectory else [p.detach() for p in params]


def formula(dtype, *, betas=(0.9, 0.999), eps=1e-8, wd=0.0, mode="coupled", eps_mode="torch", atan2=None):
    """The Adam family written out by hand, one coordinate formula per mode (independent of hf_optim)."""
    b1, b2 = betas
    xs = [p.clone() for p in initial_params(dtype)]
    ms = [torch.zeros_like(x) for x in xs]
    vs = [torch.zeros_like(x) for x in xs]
    for t, grads in enumerate(gradient_stream(dtype), start=1):
        lr_t = LR * lr_lambda(t - 1)
        for i, g in enumerate(grads):
            x = xs[i]
            if mode == "l2":
                g = g + wd * x
            elif mode == "coupled":
                x = x * (1 - lr_t * wd)
            elif mode == "independent":
                x = x * (1 - (lr_t / LR) * wd)
            elif mode == "corrected":
                x = x * (1 - (lr_t**2 / LR) * wd)
            ms[i] = b1 * ms[i] + (1 - b1) * g
            vs[i] = b2 * vs[i] + (1 - b2) * g * g
            m_hat, v_hat = ms[i] / (1 - b1**t), vs[i] / (1 - b2**t)
            if atan2 is not None:
                a, b = atan2
                x = x - lr_t * a * torch.atan2(m_hat, b * torch.sqrt(v_hat))
            elif eps_mode == "tf":  # Keras: alpha_t = lr·sqrt(1-β2^t)/(1-β1^t); x -= alpha_t·m/(sqrt(v)+ε̂)
                alpha_t = lr_t * math.sqrt(1 - b2**t) / (1 - b1**t)
                x = x - alpha_t * ms[i] / (torch.sqrt(vs[i]) + eps)
            else:
                x = x - lr_t * m_hat / (torch.sqrt(v_hat) + eps)
            xs[i] = x
    return xs


def assert_close(actual, expected, dtype):
    """Absolute tolerance only (``rtol=0``): 1e-12 in float64, 1e-6 in float32. The parameters stay below ~4 in
    magnitude, where an fp32 ulp is <= 4.8e-7, so 1e-6 is >= 2 ulps everywhere; measured worst over this file:
    4.8e-7 (fp32, one ulp at 3.7) and 4.4e-16 (fp64)."""
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, atol=TOL[dtype], rtol=0)


TORCH_IMPLS = {"for-loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}


# Each of our paths against torch's for-loop, and our for-loop against torch's foreach and fused paths.
PAIRS = [(impl, "for-loop") for impl in OURS] + [("for-loop", "foreach"), ("for-loop", "fused")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("impl", "torch_impl"), PAIRS)
def test_coupled_adamw_equals_torch_adamw(dtype, impl, torch_impl):
    expected = run(lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=0.1, **TORCH_IMPLS[torch_impl]), dtype)
    actual = run(lambda ps: hf_optim.AdamW(ps, lr=LR, weight_decay=0.1, implementation=impl), dtype)
    assert_close(actual, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", OURS)
def test_maximize_equals_torch(dtype, impl):
    expected = run(lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=0.1, maximize=True), dtype)
    actual = run(lambda ps: hf_optim.AdamW(ps, lr=LR, weight_decay=0.1, maximize=True, implementation=impl), dtype)
    assert_close(actual, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", OURS)
def test_l2_adam_equals_torch_adam(dtype, impl):
    expected = run(lambda ps: torch.optim.Adam(ps, lr=LR, weight_decay=0.05), dtype)
    actual = run(lambda ps: hf_optim.Adam(ps, lr=LR, weight_decay=0.05, implementation=impl), dtype)
    assert_close(actual, expected, dtype)
    # ...and the defaults are torch.optim.Adam's (weight_decay_mode="l2").
    assert hf_optim.Adam([torch.zeros(1)]).defaults["weight_decay_mode"] == "l2"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", OURS)
def test_independent_equals_formula_and_rescaled_torch_adamw(dtype, impl):
    lam = 1e-4
    actual = run(
        lambda ps: hf_optim.AdamW(ps, lr=LR, weight_decay=lam, weight_decay_mode="independent", implementation=impl),
        dtype,
    )
    assert_close(actual, formula(dtype, wd=lam, mode="independent"), dtype)
    assert_close(actual, run(lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=lam / LR), dtype), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", OURS)
def test_corrected_equals_formula(dtype, impl):
    lam = LR  # PaLM's lr² decay
    actual = run(
        lambda ps: hf_optim.AdamW(ps, lr=LR, weight_decay=lam, weight_decay_mode="corrected", implementation=impl),
        dtype,
    )
    assert_close(actual, formula(dtype, wd=lam, mode="corrected"), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", OURS)
@pytest.mark.parametrize("mode", ["coupled", "l2"])
def test_tf_eps_equals_keras_formula(dtype, impl, mode):
    # A large ε̂ makes the difference to the torch form visible (early steps see ε̂/sqrt(1-β2^t) ≈ 30·ε̂).
    kw = dict(eps=1e-3, wd=0.1, mode=mode)
    actual = run(
        lambda ps: hf_optim.Adam(
            ps, lr=LR, eps=1e-3, weight_decay=0.1, weight_decay_mode=mode, eps_mode="tf", implementation=impl
        ),
        dtype,
    )
    assert_close(actual, formula(dtype, eps_mode="tf", **kw), dtype)
    torch_form = formula(dtype, eps_mode="torch", **kw)
    assert max((a - e).abs().max().item() for a, e in zip(actual, torch_form)) > 1e-4


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", OURS)
def test_tf_eps_equals_torch_mode_when_eps_is_zero(dtype, impl):
    def build(eps_mode):
        return lambda ps: hf_optim.AdamW(ps, lr=LR, eps=0.0, weight_decay=0.1, eps_mode=eps_mode, implementation=impl)

    assert_close(run(build("tf"), dtype), run(build("torch"), dtype), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", ["for-loop", "foreach"])
@pytest.mark.parametrize("decoupled", [False, True])
def test_radam_equals_torch_radam_every_step(dtype, impl, decoupled):
    """Whole trajectory, so the first steps (rho_t <= 5: momentum steps) are checked one by one."""
    expected = run(
        lambda ps: torch.optim.RAdam(ps, lr=LR, weight_decay=0.05, decoupled_weight_decay=decoupled),
        dtype,
        trajectory=True,
    )
    mode = "coupled" if decoupled else "l2"
    actual = run(
        lambda ps: hf_optim.RAdam(ps, lr=LR, weight_decay=0.05, weight_decay_mode=mode, implementation=impl),
        dtype,
        trajectory=True,
    )
    for step, (a, e) in enumerate(zip(actual, expected), start=1):
        assert_close(a, e, dtype), step


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", ["for-loop", "foreach"])
@pytest.mark.parametrize("a_b", [(1.27, 1.0), (1.0, 2.0), (1.27, 0.0)])
def test_adam_atan2_equals_formula(dtype, impl, a_b):
    """b = 0 included: a·atan2(m̂, 0) = a·π/2·sign(m̂), not RAdam's plain momentum step a·m."""
    a, b = a_b
    actual = run(lambda ps: hf_optim.AdamAtan2(ps, lr=LR, weight_decay=0.1, a=a, b=b, implementation=impl), dtype)
    assert_close(actual, formula(dtype, wd=0.1, mode="coupled", atan2=(a, b)), dtype)


def test_adam_atan2_paper_defaults_and_zero_gradient():
    p = torch.ones(3, requires_grad=True)
    opt = hf_optim.AdamAtan2([p], weight_decay=0.0)
    assert (opt.defaults["a"], opt.defaults["b"]) == (1.27, 1.0)
    p.grad = torch.zeros(3)
    opt.step()  # atan2(0, 0) = 0: no NaN without an epsilon
    assert torch.equal(p.detach(), torch.ones(3))


@pytest.mark.parametrize("impl", OURS)
def test_tf_eps_with_params_at_different_steps(impl):
    """A parameter without a gradient skips steps, so a group holds different step counts (fused splits by step)."""

    def go(implementation):
        torch.manual_seed(3)
        ps = [torch.randn(5, requires_grad=True) for _ in range(3)]
        opt = hf_optim.AdamW(ps, lr=LR, eps=1e-2, eps_mode="tf", implementation=implementation)
        for t in range(8):
            for i, p in enumerate(ps):
                p.grad = torch.randn(5) if (i != 1 or t % 3 == 0) else None
            opt.step()
        return [p.detach() for p in ps]

    assert_close(go(impl), go("for-loop"), torch.float32)


def test_independent_warns_for_lr_coupled_looking_value():
    with pytest.warns(UserWarning, match="independent"):
        hf_optim.AdamW([torch.zeros(2)], weight_decay=1e-3, weight_decay_mode="independent")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hf_optim.AdamW([torch.zeros(2)], weight_decay=1e-4, weight_decay_mode="independent")


def test_defaults_document_the_class_semantics():
    x = [torch.zeros(1)]
    assert hf_optim.AdamW(x).defaults["weight_decay_mode"] == "coupled"
    assert hf_optim.AdamW(x).defaults["weight_decay"] == torch.optim.AdamW(x).defaults["weight_decay"]
    assert hf_optim.RAdam(x).defaults["eps_mode"] == "tf"
    assert set(hf_optim.RAdam.implementations) == {"for-loop", "foreach", "compiled"}
    with pytest.raises(ValueError, match="implementation"):
        hf_optim.RAdam(x, implementation="fused")


def test_bf16_param_keeps_fp32_state_and_rounds_to_nearest():
    p = torch.tensor([1.0, -2.0, 3.0], dtype=torch.bfloat16, requires_grad=True)
    q = p.detach().float().clone().requires_grad_(True)
    opt = hf_optim.AdamW([p], lr=0.1, weight_decay=0.0, implementation="for-loop")
    ref = torch.optim.AdamW([q], lr=0.1, weight_decay=0.0)
    g = torch.tensor([0.3, -1.0, 2.0])
    p.grad, q.grad = g.to(torch.bfloat16), g.to(torch.bfloat16).float()
    opt.step()
    ref.step()
    assert opt.state[p]["exp_avg"].dtype == torch.float32
    assert torch.equal(p.detach(), q.detach().to(torch.bfloat16))  # fp32 result rounded to nearest


@pytest.mark.parametrize("impl", OURS)
def test_complex_params_equal_torch(impl):
    """Real and imaginary parts are independent coordinates, as in torch.optim.AdamW."""

    def go(factory):
        torch.manual_seed(4)
        p = torch.randn(6, dtype=torch.complex64, requires_grad=True)
        opt = factory([p])
        for _ in range(10):
            p.grad = torch.randn(6, dtype=torch.complex64)
            opt.step()
        return [p.detach()]

    expected = go(lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=0.1))
    assert_close(
        go(lambda ps: hf_optim.AdamW(ps, lr=LR, weight_decay=0.1, implementation=impl)), expected, torch.float32
    )


@pytest.mark.parametrize(("name", "value"), [("a", 0.0), ("a", -1.0), ("b", -0.5)])
def test_adam_atan2_rejects_bad_constants(name, value):
    with pytest.raises(ValueError, match=f"^{name} must be"):
        hf_optim.AdamAtan2([torch.zeros(2)], **{name: value})


@pytest.mark.parametrize("impl", ["for-loop", "foreach"])
def test_adam_atan2_b_zero_is_a_sign_step_not_a_momentum_step(impl):
    """One step from zero state: m̂ = g, so the update is exactly lr·a·π/2·sign(g) (whatever |g|)."""
    p = torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=torch.float64, requires_grad=True)
    g = torch.tensor([0.3, -1e-3, 20.0, 0.0], dtype=torch.float64)
    opt = hf_optim.AdamAtan2([p], lr=0.1, a=1.27, b=0.0, weight_decay=0.0, implementation=impl)
    p.grad = g
    opt.step()
    expected = torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=torch.float64) - 0.1 * 1.27 * (math.pi / 2) * g.sign()
    torch.testing.assert_close(p.detach(), expected, atol=1e-15, rtol=0)


def _fused_calls(monkeypatch) -> list[set[tuple[torch.device, torch.dtype]]]:
    """Spy on torch's fused Adam kernels: record the (device, dtype) set of each call's parameters."""
    calls: list[set[tuple[torch.device, torch.dtype]]] = []
    for name in ("_fused_adam_", "_fused_adamw_"):
        original = getattr(torch, name)

        def spy(params, *args, _original=original, **kwargs):
            calls.append({(p.device, p.dtype) for p in params})
            return _original(params, *args, **kwargs)

        monkeypatch.setattr(torch, name, spy)
    return calls


@pytest.mark.parametrize("mode, eps_mode", [("coupled", "torch"), ("l2", "tf"), ("independent", "tf")])
def test_fused_groups_tensors_by_device_and_dtype(monkeypatch, mode, eps_mode):
    """A group mixing fp64, fp32 and bf16 (fp32 maths) parameters: each fused call gets one (device, dtype), as
    torch's kernels require (CUDA's multi-tensor apply does; the CPU kernel happens to loop), and the result equals
    the for-loop reference of each dtype."""

    def params():
        gen = torch.Generator().manual_seed(5)
        return [
            torch.randn(7, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(True)
            for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float64)
        ]

    def train(implementation):
        ps = params()
        opt = hf_optim.AdamW(
            ps,
            lr=LR,
            eps=1e-3,
            weight_decay=0.05 if mode != "independent" else 1e-4,
            weight_decay_mode=mode,
            eps_mode=eps_mode,
            implementation=implementation,
        )
        gen = torch.Generator().manual_seed(6)
        for _ in range(5):
            for p in ps:
                p.grad = torch.randn(7, generator=gen, dtype=torch.float64).to(p.dtype)
            opt.step()
        return ps

    calls = _fused_calls(monkeypatch)
    fused = train("fused")
    assert calls and all(len(devices_dtypes) == 1 for devices_dtypes in calls), calls
    assert {next(iter(c))[1] for c in calls} == {torch.float32, torch.float64}
    for a, e in zip(fused, train("for-loop")):
        # bf16: both paths do fp32 maths, but fused and for-loop round differently in fp32, which may move a value
        # across a bf16 rounding boundary: one bf16 ulp (2^-7 relative) is the bound there.
        atol = {torch.float64: TOL[torch.float64], torch.float32: TOL[torch.float32]}.get(
            a.dtype, 2.0**-7 * e.abs().max().item()
        )
        torch.testing.assert_close(a, e, atol=atol, rtol=0)


def test_fused_mixed_dtypes_equal_torch_fused_adamw():
    """The same mixed fp32/fp64 group through torch.optim.AdamW(fused=True), which groups by device and dtype."""

    def go(factory):
        gen = torch.Generator().manual_seed(7)
        ps = [
            torch.randn(9, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(True)
            for dtype in (torch.float32, torch.float64, torch.float32)
        ]
        opt = factory(ps)
        for _ in range(6):
            for p in ps:
                p.grad = torch.randn(9, generator=gen, dtype=torch.float64).to(p.dtype)
            opt.step()
        return ps

    ours = go(lambda ps: hf_optim.AdamW(ps, lr=LR, weight_decay=0.1, implementation="fused"))
    ref = go(lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=0.1, fused=True))
    for a, e in zip(ours, ref):
        assert torch.equal(a, e)


@pytest.mark.parametrize("cls", [hf_optim.Adam, hf_optim.AdamW, hf_optim.RAdam, hf_optim.AdamAtan2])
def test_class_docstring_states_update_rule_and_references(cls):
    """help(hf_optim.AdamW) must show the rule itself (an algorithm box as torch.optim's), not a pointer elsewhere."""
    doc = cls.__doc__
    assert r"\begin{aligned}" in doc and r"\end{aligned}" in doc
    assert r"\hat m_t" in doc and "References" in doc
