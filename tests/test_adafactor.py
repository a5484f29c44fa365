"""Adafactor: presets equal their references (transformers, torch, float64 formulas), memory, clipping, validation."""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch
from transformers.optimization import Adafactor as HFAdafactor

from hf_optim.optim.adafactor.optimizer import Adafactor, check_factorable
from hf_optim.precision import stochastic_round_

SHAPES = [(8, 6), (5,), (3, 4, 5)]  # a matrix, a vector and a 3-D tensor in every comparison


def _run_pair(make_ref, make_ours, *, shapes=SHAPES, dtype=torch.float32, steps=100, schedule=None):
    """Run both optimizers on identical parameters and gradient streams; return both parameter lists."""
    torch.manual_seed(0)
    init = [torch.randn(s, dtype=torch.float64).to(dtype) for s in shapes]
    ref = [torch.nn.Parameter(t.clone()) for t in init]
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    opt_ref, opt_ours = make_ref(ref), make_ours(ours)
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, schedule) for o in (opt_ref, opt_ours)] if schedule else []
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for a, b in zip(ref, ours):
            grad = torch.randn(a.shape, generator=gen, dtype=torch.float64).to(dtype)
            a.grad, b.grad = grad.clone(), grad.clone()
        opt_ref.step()
        opt_ours.step()
        for s in scheds:
            s.step()
    return ref, ours


def _assert_close(ref, ours, atol=1e-6):
    for a, b in zip(ref, ours):
        torch.testing.assert_close(b.detach().double(), a.detach().double(), atol=atol, rtol=0)


TRAINER = dict(lr=1e-3, relative_step=False, scale_parameter=False)  # the Trainer's stock `adafactor` choice


@pytest.mark.parametrize(
    "hf_kwargs, ours_kwargs, dtype",
    [
        pytest.param(TRAINER, TRAINER, torch.float32, id="trainer"),
        pytest.param({**TRAINER, "beta1": 0.9}, {**TRAINER, "beta1": 0.9}, torch.float32, id="beta1"),
        pytest.param({**TRAINER, "weight_decay": 0.01}, {**TRAINER, "weight_decay": 0.01}, torch.float32, id="wd"),
        pytest.param(
            {**TRAINER, "beta1": 0.9, "weight_decay": 0.01},
            {**TRAINER, "beta1": 0.9, "weight_decay": 0.01},
            torch.float32,
            id="beta1-wd",
        ),
        # transformers' lr=None is our lr multiplier 1.0 (the preset's default).
        pytest.param(
            dict(warmup_init=True, weight_decay=0.01),
            dict(warmup_init=True, weight_decay=0.01),
            torch.float32,
            id="relative-scale-warmup",
        ),
        pytest.param(dict(beta1=0.9), dict(beta1=0.9), torch.float32, id="relative-scale"),
        pytest.param({**TRAINER, "beta1": 0.9}, {**TRAINER, "beta1": 0.9}, torch.bfloat16, id="bf16"),
        pytest.param(dict(weight_decay=0.01), dict(weight_decay=0.01), torch.bfloat16, id="bf16-relative"),
    ],
)
@pytest.mark.parametrize("implementation", ["for-loop", "foreach"])
def test_hf_preset_equals_transformers(hf_kwargs, ours_kwargs, dtype, implementation):
    ref, ours = _run_pair(
        lambda p: HFAdafactor(p, **hf_kwargs),
        lambda p: Adafactor(p, preset="hf", implementation=implementation, **ours_kwargs),
        dtype=dtype,
    )
    _assert_close(ref, ours)


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("foreach", [False, True])
def test_torch_preset_equals_torch(weight_decay, maximize, foreach):
    ref, ours = _run_pair(
        lambda p: torch.optim.Adafactor(p, lr=1e-2, weight_decay=weight_decay, maximize=maximize, foreach=foreach),
        lambda p: Adafactor(
            p,
            lr=1e-2,
            preset="torch",
            weight_decay=weight_decay,
            maximize=maximize,
            implementation="foreach" if foreach else "for-loop",
        ),
    )
    _assert_close(ref, ours)


# ---------------------------------------------------------------------------------------------------------------
# Float64 reference written from the papers' formulas (independent of the implementation's structure).


def _reference(
    x0,
    grads,
    *,
    lr,
    factored_dims,
    beta1,
    before_lr,
    momentum_dtype,
    decay_rate,
    cap,
    eps1,
    eps2,
    d,
    relative_step,
    scale_parameter,
    wd_rate,
    schedule,
    rho_max=1e-2,
    l2=0.0,
    info=None,
):
    """Adafactor in float64 for one tensor; ``factored_dims`` = (row, col) or None; returns the final parameter.

    ``wd_rate(lr_t, lr, s_t)`` is the fraction decayed at step t (``s_t`` the effective step size); ``l2`` adds
    ``l2·x`` to the gradient. ``info`` (a dict) receives which branches bound: ``cap_bound`` and ``eps2_floor``
    (steps where β2 hit the cap / where max(eps2, RMS(x)) was eps2) and ``inv_sqrt`` (steps where 1/sqrt(t) < ρ_max).
    """
    x = x0.clone()
    state_r = state_c = state_v = None
    m = torch.zeros_like(x)
    info = {} if info is None else info
    info.update(cap_bound=0, eps2_floor=0, inv_sqrt=0)
    for t, g in enumerate(grads, start=1):
        lr_t = lr * schedule(t - 1)
        g = g + l2 * x
        beta2 = 1 - t ** (-decay_rate)
        if cap is not None and beta2 > cap:
            beta2 = cap
            info["cap_bound"] += 1
        g2 = g * g + eps1
        if factored_dims is not None:
            i, j = factored_dims
            r_new, c_new = g2.mean(dim=j, keepdim=True), g2.mean(dim=i, keepdim=True)
            state_r = r_new if state_r is None else beta2 * state_r + (1 - beta2) * r_new
            state_c = c_new if state_c is None else beta2 * state_c + (1 - beta2) * c_new
            vhat = state_r * state_c / state_r.mean(dim=i, keepdim=True)
        else:
            state_v = g2 if state_v is None else beta2 * state_v + (1 - beta2) * g2
            vhat = state_v
        u = g / vhat.sqrt()
        rms_u = u.pow(2).mean().sqrt().item()
        u = u / max(1.0, rms_u / d)
        step = lr_t * min(rho_max, 1 / math.sqrt(t)) if relative_step else lr_t
        info["inv_sqrt"] += relative_step and 1 / math.sqrt(t) < rho_max
        if scale_parameter:
            rms_x = x.pow(2).mean().sqrt().item()
            info["eps2_floor"] += rms_x < eps2
            step *= max(eps2, rms_x)
        if beta1 is None:
            delta = step * u
        elif before_lr:
            m_new = beta1 * m + (1 - beta1) * u
            m = m_new.to(momentum_dtype).double()  # stored rounded; the step uses the unrounded value
            delta = step * m_new
        else:
            m = beta1 * m + (1 - beta1) * step * u
            delta = m
        x = x - wd_rate(lr_t, lr, step) * x - delta
    return x


def _run_ours(x0, grads, make, schedule):
    p = torch.nn.Parameter(x0.clone())
    opt = make([p])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    for g in grads:
        p.grad = g.clone()
        opt.step()
        sched.step()
    return p.detach()


def _grads(shape, steps=20, seed=3):
    gen = torch.Generator().manual_seed(seed)
    # Row/column-dependent scales so a factored estimate differs from an unfactored one.
    scale = torch.rand(shape, generator=gen, dtype=torch.float64) * 3 + 0.1
    return [torch.randn(shape, generator=gen, dtype=torch.float64) * scale for _ in range(steps)]


def _cosine(k):
    return 0.5 * (1 + math.cos(math.pi * min(k, 20) / 25))


@pytest.mark.parametrize(
    "shape, dims",
    [((130, 129), (0, 1)), ((2, 140, 130), (1, 2)), ((140, 2, 130), (0, 2)), ((4, 3), None), ((129,), None)],
)
@pytest.mark.parametrize("momentum_dtype", ["float32", "bfloat16"])
def test_adafactor_v2_matches_float64_formula(shape, dims, momentum_dtype):
    torch.manual_seed(0)
    x0, grads = torch.randn(shape, dtype=torch.float64), _grads(shape)
    lam = 1e-4
    ours = _run_ours(
        x0, grads, lambda p: Adafactor(p, lr=3e-3, weight_decay=lam, momentum_dtype=momentum_dtype), _cosine
    )
    ref = _reference(
        x0,
        grads,
        lr=3e-3,
        factored_dims=dims,
        beta1=0.9,
        before_lr=True,
        # "float32" means full precision: fp64 for fp64 parameters
        momentum_dtype=torch.bfloat16 if momentum_dtype == "bfloat16" else torch.float64,
        decay_rate=0.8,
        cap=0.999,
        eps1=1e-30,
        eps2=1e-3,
        d=1.0,
        relative_step=False,
        scale_parameter=False,
        wd_rate=lambda lr_t, lr, _: lam * lr_t / lr,  # independent: λ times the schedule only
        schedule=_cosine,
    )
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=1e-12)


def test_palm_matches_float64_formula():
    shape = (140, 130)
    torch.manual_seed(0)
    x0, grads = torch.randn(shape, dtype=torch.float64) * 0.02, _grads(shape)
    ours = _run_ours(x0, grads, lambda p: Adafactor(p, preset="palm"), _cosine)
    ref = _reference(
        x0,
        grads,
        lr=1e-2,
        factored_dims=None,
        beta1=0.9,
        before_lr=False,
        momentum_dtype=torch.float64,
        decay_rate=0.8,
        cap=None,
        eps1=1e-30,
        eps2=1e-3,
        d=1.0,
        relative_step=False,
        scale_parameter=True,
        wd_rate=lambda lr_t, lr, _: lr_t**2,
        schedule=_cosine,
    )  # PaLM: lr_t² decay
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("lr", [1.0, 0.5])
def test_t5_matches_float64_formula(lr):
    shape = (130, 140)
    torch.manual_seed(0)
    x0, grads = torch.randn(shape, dtype=torch.float64), _grads(shape)
    ours = _run_ours(x0, grads, lambda p: Adafactor(p, lr=lr, preset="t5"), _cosine)
    # The lr multiplies the relative step, so the Trainer's schedule composes with min(1e-2, 1/sqrt(t)).
    ref = _reference(
        x0,
        grads,
        lr=lr,
        factored_dims=(0, 1),
        beta1=None,
        before_lr=False,
        momentum_dtype=torch.float64,
        decay_rate=0.8,
        cap=None,
        eps1=1e-30,
        eps2=1e-3,
        d=1.0,
        relative_step=True,
        scale_parameter=True,
        wd_rate=lambda lr_t, lr, _: 0.0,
        schedule=_cosine,
    )
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=1e-12)


# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["adafactor_v2", "hf", "t5"])
@pytest.mark.parametrize("d", [0.5, 1.0])
def test_clipped_update_rms_at_most_d(preset, d):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(160, 150, dtype=torch.float64))
    # Pure update: lr 1, no momentum, no relative step or scaling: x_{t-1} - x_t = the clipped U.
    opt = Adafactor(
        [p], lr=1.0, preset=preset, beta1=None, relative_step=False, scale_parameter=False, clip_threshold=d
    )
    clipped = 0
    for g in _grads((160, 150), steps=10):
        before = p.detach().clone()
        p.grad = g
        opt.step()
        rms = (before - p.detach()).pow(2).mean().sqrt().item()
        assert rms <= d * (1 + 1e-12)
        clipped += math.isclose(rms, d, rel_tol=1e-9)
    assert clipped > 0  # clipping was active at least once (step 1 of a factored estimate overshoots)


@pytest.mark.parametrize("beta1, momentum_bytes", [(None, 0), (0.9, 2 * 1024 * 1024)])
def test_factored_state_of_1024_square_weight(beta1, momentum_bytes):
    p = torch.nn.Parameter(torch.zeros(1024, 1024))
    opt = Adafactor([p], lr=1e-3, beta1=beta1)
    p.grad = torch.ones_like(p)
    opt.step()
    state = opt.state[p]
    assert state["exp_avg_sq_row"].numel() + state["exp_avg_sq_col"].numel() == 2 * 1024
    assert "exp_avg_sq" not in state
    moments = sum(t.numel() * t.element_size() for k, t in state.items() if k == "exp_avg")
    assert moments == momentum_bytes  # bf16 momentum: 2 bytes per parameter
    assert set(state) == {"step", "exp_avg_sq_row", "exp_avg_sq_col"} | ({"exp_avg"} if beta1 else set())


@pytest.mark.parametrize("preset", ["adafactor_v2", "hf", "palm", "t5"])
def test_foreach_equals_for_loop(preset):
    ref, ours = _run_pair(
        lambda p: Adafactor(p, preset=preset, beta1=0.9, weight_decay=1e-4, implementation="for-loop"),
        lambda p: Adafactor(p, preset=preset, beta1=0.9, weight_decay=1e-4, implementation="foreach"),
        shapes=[(200, 130), (7,), (3, 4, 5)],
        steps=20,
    )
    _assert_close(ref, ours, atol=1e-7)


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(140, 130)), torch.nn.Parameter(torch.randn(130))]
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = Adafactor(params, lr=1e-2, weight_decay=1e-4)
    grads = [[torch.randn_like(p) for p in params] for _ in range(6)]
    for gs in grads[:3]:
        for p, g in zip(params, gs):
            p.grad = g
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    for p, q in zip(params, twin):
        q.data.copy_(p.detach())
    opt2 = Adafactor(twin, lr=1.0, preset="hf")  # every resolved knob comes back from the state dict
    opt2.load_state_dict(torch.load(buffer, weights_only=True))
    for gs in grads[3:]:
        for p, q, g in zip(params, twin, gs):
            p.grad, q.grad = g, g.clone()
        opt.step()
        opt2.step()
    _assert_close(params, twin, atol=0)


def test_stochastic_rounding_is_unbiased_and_lands_on_neighbours():
    torch.manual_seed(0)
    low, high = torch.tensor(1.0), torch.tensor(1.0 + 2**-7)  # adjacent bfloat16 values
    src = torch.full((200_000,), 1.0 + 0.25 * 2**-7)
    dst = torch.empty_like(src, dtype=torch.bfloat16)
    stochastic_round_(dst, src)
    values = dst.float()
    assert bool(((values == low) | (values == high)).all())
    assert abs((values == high).float().mean().item() - 0.25) < 0.01


def test_stochastic_rounding_moves_bf16_params_where_nearest_rounding_stalls():
    def final(sr):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
        opt = Adafactor([p], lr=1e-3, beta1=None, stochastic_rounding=sr)
        for _ in range(50):
            p.grad = torch.ones_like(p)  # U = 1 each step: the exact result is 1 - 50·1e-3
            opt.step()
        return p.float().mean().item()

    assert final(False) == 1.0  # each 1e-3 step is below half a bf16 ulp at 1.0
    assert abs(final(True) - 0.95) < 2e-3


def test_errors_name_the_argument():
    p = [torch.nn.Parameter(torch.zeros(2, 2))]
    with pytest.raises(ValueError, match="preset"):
        Adafactor(p, preset="fairseq")
    with pytest.raises(TypeError, match=r"beta_1.*Did you mean 'beta1'"):
        Adafactor(p, beta_1=0.9)
    with pytest.raises(ValueError, match=r"decay_rate.*0.8"):
        Adafactor(p, decay_rate=-0.8)
    with pytest.raises(ValueError, match="warmup_init"):
        Adafactor(p, warmup_init=True)
    with pytest.raises(ValueError, match="factor_dims"):
        Adafactor(p, factor_dims="first_two")
    with pytest.raises(ValueError, match="clip_threshold"):
        Adafactor(p, clip_threshold=0.0)
    with pytest.raises(ValueError, match="beta1"):
        Adafactor(p, beta1=1.0)
    with pytest.raises(ValueError, match="momentum_dtype"):
        Adafactor(p, momentum_dtype="float16")
    with pytest.warns(UserWarning, match="relative_step"):
        Adafactor(p, preset="t5", lr=1e-3)


def test_flat_partitions_are_refused_with_a_clear_message():
    flat = torch.nn.Parameter(torch.zeros(64))
    flat._is_flat_param = True  # what FSDP1's FlatParameter reports
    with pytest.raises(ValueError, match="use_orig_params=True"):
        Adafactor([flat])
    ds = torch.nn.Parameter(torch.zeros(64))
    ds.ds_id = 3  # DeepSpeed ZeRO-3 marks its parameters
    with pytest.raises(ValueError, match="DeepSpeed"):
        check_factorable([ds])
    Adafactor([flat], factored=False)  # unfactored Adafactor works on flat partitions
    with pytest.warns(UserWarning, match="flat partition"):
        assert check_factorable([torch.zeros(1 << 20)], strict=False)
    assert check_factorable([torch.zeros(3, 4), torch.zeros(4)]) == []


# ---------------------------------------------------------------------------------------------------------------
# Knob branches against the float64 formula: each test also checks that its branch really bound.

_SMALL = (12, 10)  # factored over (0, 1) with min_dim_size_to_factor=2
_V2 = dict(
    lr=3e-3,
    factored_dims=(0, 1),
    beta1=0.9,
    before_lr=True,
    momentum_dtype=torch.float64,
    decay_rate=0.8,
    cap=0.999,
    eps1=1e-30,
    eps2=1e-3,
    d=1.0,
    relative_step=False,
    scale_parameter=False,
    wd_rate=lambda lr_t, lr, s: 0.0,
    schedule=_cosine,
)  # the adafactor_v2 preset with fp32 momentum


def _v2(**knobs):
    return lambda p: Adafactor(p, lr=3e-3, min_dim_size_to_factor=2, momentum_dtype="float32", **knobs)


def _assert_formula(ours, ref):
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("decay_rate, cap", [(0.8, 0.6), (1.5, 0.9)])
@pytest.mark.parametrize("implementation", ["for-loop", "foreach"])
def test_beta2_cap_binding_matches_formula(decay_rate, cap, implementation):
    torch.manual_seed(0)
    x0, grads = torch.randn(_SMALL, dtype=torch.float64), _grads(_SMALL)
    ours = _run_ours(x0, grads, _v2(decay_rate=decay_rate, beta2_cap=cap, implementation=implementation), _cosine)
    info = {}
    ref = _reference(x0, grads, **{**_V2, "decay_rate": decay_rate, "cap": cap}, info=info)
    _assert_formula(ours, ref)
    assert info["cap_bound"] >= 10  # 1 - t^-c exceeds the cap from step 3 (c=0.8) / 5 (c=1.5) on
    uncapped = _reference(x0, grads, **{**_V2, "decay_rate": decay_rate, "cap": None})
    assert (uncapped - ref).abs().max() > 1e-6


@pytest.mark.parametrize("implementation", ["for-loop", "foreach"])
def test_relative_step_inverse_sqrt_branch_matches_formula(implementation):
    """rho_max = 1: min(1, 1/sqrt(t)) = 1/sqrt(t) at every step (the T5 preset otherwise sits at rho_max = 1e-2)."""
    torch.manual_seed(0)
    x0, grads = torch.randn(_SMALL, dtype=torch.float64), _grads(_SMALL)
    make = lambda p: Adafactor(
        p, lr=0.5, preset="t5", rho_max=1.0, min_dim_size_to_factor=2, implementation=implementation
    )
    ours = _run_ours(x0, grads, make, _cosine)
    t5 = dict(_V2, lr=0.5, beta1=None, cap=None, relative_step=True, scale_parameter=True)
    info = {}
    ref = _reference(x0, grads, **t5, rho_max=1.0, info=info)
    _assert_formula(ours, ref)
    assert info["inv_sqrt"] == len(grads) - 1  # every step but t = 1, where 1/sqrt(1) = rho_max
    assert (_reference(x0, grads, **t5) - ref).abs().max() > 1e-3  # the default rho_max = 1e-2 caps instead


@pytest.mark.parametrize("implementation", ["for-loop", "foreach"])
def test_parameter_scale_eps2_floor_matches_formula(implementation):
    """Parameters with RMS < eps2: the step size is lr·eps2, not lr·RMS(x)."""
    torch.manual_seed(0)
    x0, grads = torch.randn(_SMALL, dtype=torch.float64) * 1e-5, _grads(_SMALL)
    ours = _run_ours(x0, grads, _v2(scale_parameter=True, implementation=implementation), _cosine)
    info = {}
    ref = _reference(x0, grads, **{**_V2, "scale_parameter": True}, info=info)
    _assert_formula(ours, ref)
    assert info["eps2_floor"] == len(grads)
    no_floor = _reference(x0, grads, **{**_V2, "scale_parameter": True, "eps2": 0.0})
    assert (no_floor - ref).abs().max() > 1e-6


@pytest.mark.parametrize("implementation", ["for-loop", "foreach"])
def test_l2_decay_matches_formula(implementation):
    """weight_decay_mode="l2": λx is added to the gradient before the statistics (so it is preconditioned)."""
    torch.manual_seed(0)
    x0, grads = torch.randn(_SMALL, dtype=torch.float64), _grads(_SMALL)
    lam = 0.3
    ours = _run_ours(x0, grads, _v2(weight_decay=lam, weight_decay_mode="l2", implementation=implementation), _cosine)
    ref = _reference(x0, grads, **_V2, l2=lam)
    _assert_formula(ours, ref)
    assert (_reference(x0, grads, **_V2) - ref).abs().max() > 1e-4


@pytest.mark.parametrize("mode", ["independent", "corrected"])
@pytest.mark.parametrize("implementation", ["for-loop", "foreach"])
def test_decay_at_the_effective_step_matches_formula(mode, implementation):
    """weight_decay_lr="step": the rate uses s_t = lr_t·max(eps2, RMS(x)) (parameter scaling on), so independent is
    λ·s_t/α and corrected λ·s_t²/α, with α the peak lr."""
    torch.manual_seed(0)
    x0, grads = torch.randn(_SMALL, dtype=torch.float64) * 3, _grads(_SMALL)
    lam = {"independent": 1e-1, "corrected": 30.0}[mode]  # large: the decay must move the result visibly
    knobs = dict(scale_parameter=True, weight_decay=lam, weight_decay_mode=mode, weight_decay_lr="step")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # λ = 0.1 looks lr-coupled for "independent" (it is not here)
        ours = _run_ours(x0, grads, _v2(implementation=implementation, **knobs), _cosine)
    power = 1 if mode == "independent" else 2
    base = {**_V2, "scale_parameter": True}
    ref = _reference(x0, grads, **{**base, "wd_rate": lambda lr_t, lr, s: lam * s**power / lr})
    _assert_formula(ours, ref)
    # ...and not the group-lr rate λ·lr_t^power/α, which is ~RMS(x)^-power times larger
    group_lr = _reference(x0, grads, **{**base, "wd_rate": lambda lr_t, lr, s: lam * lr_t**power / lr})
    assert (group_lr - ref).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------------------------
# Defects, one test each.


def test_palm_weight_decay_sentinel_is_resolved_before_overrides_multiply_it():
    """palm stores weight_decay="lr" (λ = the group's peak lr); a muP-style weight_decay_mult must scale the
    number, not the string, and see the group's lr after its own lr_mult."""
    p = torch.nn.Parameter(torch.randn(20, dtype=torch.float64))
    q = torch.nn.Parameter(torch.randn(20, dtype=torch.float64))
    r = torch.nn.Parameter(torch.randn(20, dtype=torch.float64))
    opt = Adafactor(
        [p, q, r],
        preset="palm",
        param_overrides={p: {"weight_decay_mult": 2.0}, q: {"lr_mult": 0.5, "weight_decay_mult": 3.0}},
    )
    by_param = {id(g["params"][0]): g for g in opt.param_groups}
    assert by_param[id(p)]["weight_decay"] == pytest.approx(2 * 1e-2, rel=1e-15)
    assert by_param[id(q)]["lr"] == pytest.approx(5e-3) and by_param[id(q)]["weight_decay"] == pytest.approx(1.5e-2)
    assert by_param[id(r)]["weight_decay"] == pytest.approx(1e-2)  # no override: λ = lr, as before
    # One step with zero gradients moves only by the decay: corrected mode, r = λ·lr_t²/lr_peak = mult·lr² here.
    before = [t.detach().clone() for t in (p, q, r)]
    for t in (p, q, r):
        t.grad = torch.zeros_like(t)
    opt.step()
    for t, x0, rate in zip((p, q, r), before, (2 * 1e-2**2, 3 * 5e-3**2, 1e-2**2)):
        torch.testing.assert_close(t.detach(), x0 * (1 - rate), atol=1e-15, rtol=0)


@pytest.mark.parametrize("eps1_mode", ["add", "clamp"])
def test_eps1_zero_is_rejected(eps1_mode):
    """eps1 = 0 would give V = 0 on an all-zero gradient row, and an update 0/0 = NaN."""
    with pytest.raises(ValueError, match="eps1 must be > 0"):
        Adafactor([torch.nn.Parameter(torch.zeros(4, 4))], eps1=0.0, eps1_mode=eps1_mode)


@pytest.mark.parametrize("preset", ["adafactor_v2", "hf", "torch", "t5"])
def test_all_zero_gradient_rows_stay_finite(preset):
    p = torch.nn.Parameter(torch.randn(6, 5))
    opt = Adafactor([p], preset=preset, min_dim_size_to_factor=2, beta1=None)
    before = p.detach().clone()
    for _ in range(3):
        g = torch.randn(6, 5)
        g[2] = 0.0  # a row (e.g. an unused embedding) and a column without gradient
        g[:, 3] = 0.0
        p.grad = g
        opt.step()
    assert torch.isfinite(p).all()
    assert torch.equal(p.detach()[2], before[2]) and torch.equal(p.detach()[:, 3], before[:, 3])


def test_decay_rate_must_be_positive_as_documented():
    assert "c > 0" in Adafactor.__doc__
    for value in (0.0, -0.8):
        with pytest.raises(ValueError, match="decay_rate must be > 0"):
            Adafactor([torch.nn.Parameter(torch.zeros(2, 2))], decay_rate=value)
    Adafactor([torch.nn.Parameter(torch.zeros(2, 2))], decay_rate=1e-3)


def test_flat_partitions_swapped_in_after_construction_are_refused_at_the_first_step():
    """DeepSpeed ZeRO-1/2 build the optimizer on the model's parameters, then replace each group's params by one
    flat fp32 1-D partition: the first step must raise the construction-time error, not silently run unfactored."""
    w, b = torch.nn.Parameter(torch.randn(256, 256)), torch.nn.Parameter(torch.randn(256))
    opt = Adafactor([w, b], lr=1e-3)
    flat = torch.nn.Parameter(torch.cat([w.detach().flatten(), b.detach()])[: (w.numel() + b.numel()) // 2])
    opt.param_groups[0]["params"] = [flat]  # what stage_1_and_2.py does with single_partition_of_fp32_groups
    flat.grad = torch.randn_like(flat)
    with pytest.raises(ValueError, match="cannot factor its second moment"):
        opt.step()
    assert not opt.state.get(flat)

    ds = torch.nn.Parameter(torch.zeros(64))
    ds.ds_id = 7  # a ZeRO-3 parameter swapped in later: the same check as at construction
    opt = Adafactor([torch.nn.Parameter(torch.randn(4, 4))], lr=1e-3)
    opt.param_groups[0]["params"] = [ds]
    ds.grad = torch.ones(64)
    with pytest.raises(ValueError, match="DeepSpeed"):
        opt.step()


def test_groups_of_vectors_and_unfactored_groups_are_not_refused():
    vec = torch.nn.Parameter(torch.randn(300))
    opt = Adafactor([vec], lr=1e-3)  # never had a matrix: nothing was lost
    vec.grad = torch.randn(300)
    opt.step()
    w = torch.nn.Parameter(torch.randn(256, 256))
    opt = Adafactor([w], lr=1e-3, factored=False)
    flat = torch.nn.Parameter(w.detach().flatten().clone())
    opt.param_groups[0]["params"] = [flat]
    flat.grad = torch.randn_like(flat)
    opt.step()  # factored=False is the documented way to run on flat partitions
    assert "exp_avg_sq" in opt.state[flat]


def test_class_docstring_states_update_rule_references_and_bf16_rounding():
    doc = Adafactor.__doc__
    assert r"\begin{aligned}" in doc and "References" in doc and "Shazeer & Stern 2018" in doc
    assert "round-to-nearest" in doc and "stochastic_rounding" in doc
