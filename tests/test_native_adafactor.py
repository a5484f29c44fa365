"""The C Adafactor kernel (``implementation="fused"``) equals the for-loop path, and falls back cleanly."""

from __future__ import annotations

import io
import warnings

import pytest
import torch

import hf_optim
from hf_optim.optim.adafactor import native

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C compiler: the fused kernel is unavailable")

# Factored matrices (wide, tall, square-ish), plus tensors the kernel does not take (vector, 3-D, small matrix).
SHAPES = [(300, 200), (130, 128), (200, 140), (64,), (3, 130, 140), (16, 8), (131, 129), (1, 150)]


def run(implementation: str, steps: int = 12, shapes=SHAPES, **knobs):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the relative-step lr warning
        opt = hf_optim.Adafactor(params, implementation=implementation, **knobs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / 4))
    gen = torch.Generator().manual_seed(1)
    for t in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * (30.0 if t == 5 else 1.0)  # one spike
        opt.step()
        sched.step()
    return params, opt


CONFIGS = {
    "v2-bf16-momentum": dict(),
    "v2-no-momentum": dict(beta1=None),
    "v2-fp32-momentum": dict(momentum_dtype="float32"),
    "v2-independent-decay-maximize": dict(momentum_dtype="float32", weight_decay=1e-4, maximize=True),
    "v2-coupled-no-clip": dict(beta1=None, clip_threshold=None, weight_decay=0.1, weight_decay_mode="coupled"),
    "v2-param-scale-decay-factor": dict(
        beta1=None, scale_parameter=True, weight_decay=0.01, weight_decay_mode="coupled", decay_as_factor=True
    ),
    "hf-trainer": dict(preset="hf", lr=1e-3, relative_step=False, scale_parameter=False, beta1=0.9, weight_decay=0.01),
    "t5": dict(preset="t5", lr=0.1),
    "palm-factored": dict(preset="palm", lr=1e-3, factored=True, weight_decay=0.0),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fused_equals_for_loop(name):
    knobs = CONFIGS[name]
    ref, opt_ref = run("for-loop", **knobs)
    fused, opt_fused = run("fused", **knobs)
    bf16_momentum = (
        knobs.get("beta1", 0.9) is not None
        and knobs.get("momentum_dtype", "bfloat16") == "bfloat16"
        and knobs.get("preset", "adafactor_v2") == "adafactor_v2"
    )
    # fp32 state: 1e-6. bf16 momentum: fp32 rounding differences may flip a bf16 rounding (1 bf16 ulp = 4e-3
    # relative of the momentum), which moves a parameter by about lr·ulp per step.
    atol = 2e-5 if bf16_momentum else 1e-6
    for a, b in zip(ref, fused):
        torch.testing.assert_close(b.detach(), a.detach(), atol=atol, rtol=0)
    for a, b in zip(ref, fused):
        for key, value in opt_ref.state[a].items():
            other = opt_fused.state[b][key]
            assert other.dtype == value.dtype and other.shape == value.shape, key
            if key.startswith("exp_avg_sq"):  # statistics: relative agreement (their scale is g² ~ 1..900)
                torch.testing.assert_close(other, value, rtol=1e-5, atol=1e-7)


def test_kernel_matches_float64_formula_on_one_step():
    """One step of adafactor_v2 with fp32 momentum against the paper's formulas in float64."""
    torch.manual_seed(3)
    x0, g = torch.randn(40, 30), torch.randn(40, 30)
    p = torch.nn.Parameter(x0.clone())
    p.grad = g.clone()
    lr, d = 1e-2, 1.0
    opt = hf_optim.Adafactor(
        [p], lr=lr, implementation="fused", min_dim_size_to_factor=8, momentum_dtype="float32", weight_decay=1e-4
    )
    opt.step()
    g64, x64 = g.double(), x0.double()
    beta2 = 0.0  # 1 - 1^-0.8: the first step keeps only the new statistics
    r = (1 - beta2) * ((g64**2).mean(1) + 1e-30)
    c = (1 - beta2) * ((g64**2).mean(0) + 1e-30)
    v = torch.outer(r, c) / r.mean()
    u = g64 / v.sqrt()
    u = u / max(1.0, (u.square().mean().sqrt() / d).item())
    m = 0.1 * u  # lerp(0, u, 1 - 0.9)
    expected = x64 - 1e-4 * x64 - lr * m  # independent decay at lr = lr_peak: rate = λ
    torch.testing.assert_close(p.detach().double(), expected, atol=0, rtol=2e-7)  # fp32 result: ~1 ulp
    torch.testing.assert_close(opt.state[p]["exp_avg"].double(), m, atol=1e-7, rtol=1e-6)


def test_auto_uses_the_kernel_for_factored_fp32_matrices(monkeypatch):
    calls = []
    original = native.adafactor_steps

    def spy(jobs, **knobs):
        calls.extend(tuple(job[0].shape) for job in jobs)
        return original(jobs, **knobs)

    monkeypatch.setattr(native, "adafactor_steps", spy)
    run("auto", steps=1)
    assert sorted(calls) == sorted([(300, 200), (130, 128), (200, 140), (131, 129)])


@pytest.mark.parametrize("name", ["v2-bf16-momentum", "v2-no-momentum", "v2-independent-decay-maximize"])
def test_batched_call_equals_row_blocks_on_threads(monkeypatch, name):
    """One thread: every matrix in one C call; several threads: large matrices in row blocks, one per thread (their
    column sums are added up per block, so the summation order differs: equal to fp32 rounding)."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        batched, _ = run("fused", **CONFIGS[name])
        torch.set_num_threads(2)
        monkeypatch.setattr(native, "PARALLEL_MIN_NUMEL", 1)  # every matrix takes the row-block path
        blocks, _ = run("fused", **CONFIGS[name])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(batched, blocks):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-5 if name == "v2-bf16-momentum" else 1e-6)


def test_state_dict_round_trip_between_fused_and_for_loop():
    ref, _ = run("fused", steps=8, shapes=SHAPES[:3], momentum_dtype="float32")
    params, opt = run("fused", steps=4, shapes=SHAPES[:3], momentum_dtype="float32")
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    loop = hf_optim.Adafactor(params, implementation="for-loop", momentum_dtype="float32")
    loop.load_state_dict(torch.load(buffer, weights_only=True))
    gen = torch.Generator().manual_seed(1)
    for t in range(8):  # replay the same gradient stream; only steps 4..7 are taken
        grads = [torch.randn(p.shape, generator=gen) * (30.0 if t == 5 else 1.0) for p in params]
        if t < 4:
            continue
        for p, g in zip(params, grads):
            p.grad = g
        for group in loop.param_groups:  # the LambdaLR warm-up of `run` is over by step 4 (factor 1)
            group["lr"] = group["lr_peak"]
        loop.step()
    for a, b in zip(ref, params):
        torch.testing.assert_close(b.detach(), a.detach(), atol=1e-6, rtol=0)


def test_unbuildable_kernel_warns_once_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_broken", None)
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setenv("HF_OPTIM_CACHE", str(tmp_path))  # empty: forces a build with the broken compiler
    with pytest.warns(RuntimeWarning, match="native Adafactor kernel could not be built"):
        params, _ = run("fused", steps=2, shapes=SHAPES[:2], beta1=None)
    ref, _ = run("for-loop", steps=2, shapes=SHAPES[:2], beta1=None)
    for a, b in zip(ref, params):
        assert torch.equal(a, b)


def test_row_blocks_on_several_threads_equal_one_thread():
    """Large matrices are split into row blocks run on torch's thread count: same result as one block."""
    shapes = [(700, 400), (257, 1100)]  # >= PARALLEL_MIN_NUMEL elements; uneven row split
    assert all(r * c >= native.PARALLEL_MIN_NUMEL for r, c in shapes)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, _ = run("fused", steps=4, shapes=shapes, momentum_dtype="float32")
        torch.set_num_threads(3)
        assert len(native._blocks(700, 700 * 400)) == 3
        three, _ = run("fused", steps=4, shapes=shapes, momentum_dtype="float32")
        ref, _ = run("for-loop", steps=4, shapes=shapes, momentum_dtype="float32")
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(one, three, ref):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0)  # column sums add in a different order
        torch.testing.assert_close(b, c, atol=1e-6, rtol=0)
