"""The compiled paths (``implementation="compiled"``) equal the eager for-loop paths within 1e-6 (fp32).

Compilation costs seconds per graph on a CPU, so each configuration uses one optimizer over a few small tensors that
land in one compiled graph (one factored matrix, one unfactored matrix, one vector), and runs a handful of steps under
a changing learning rate. The for-loop path is the reference (it is checked against transformers, torch and float64
formulas in test_adafactor.py / test_adam.py).
"""

from __future__ import annotations

import io

import pytest
import torch

import hf_optim
from hf_optim import _compiled
from hf_optim.optim.adafactor.dispatch import resolve

SHAPES = [(136, 128), (5, 7), (9,)]  # 136x128 is factored by every preset; 5x7 only by hf/torch (min dim 1)
STEPS = 7  # RAdam's rectification switches on at step 6 (β2 = 0.999): both branches run


def make_params(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=gen).to(dtype).requires_grad_(True) for s in SHAPES]


def train(opt, params, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    peaks = [g["lr"] for g in opt.param_groups]
    for t in steps:
        for group, peak in zip(opt.param_groups, peaks):
            group["lr"] = peak * (0.4 + 0.1 * t)  # a schedule: the decay rate and step size change every step
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        opt.step()


def run(build, impl, steps=range(STEPS)):
    params = make_params()
    opt = build(params, impl)
    train(opt, params, steps)
    return params, opt


def assert_same(actual, expected):
    (pa, oa), (pe, oe) = actual, expected
    for a, e in zip(pa, pe, strict=True):
        torch.testing.assert_close(a.detach(), e.detach(), atol=1e-6, rtol=1e-6)
    for a, e in zip(pa, pe):  # the state too (statistics, momentum in its own dtype, step count)
        sa, se = oa.state[a], oe.state[e]
        assert sa.keys() == se.keys()
        for key in sa:
            assert sa[key].dtype == se[key].dtype, key
            tol = 1e-2 if sa[key].dtype == torch.bfloat16 else 1e-6  # bf16 momentum: one rounding apart at most
            torch.testing.assert_close(sa[key].float(), se[key].float(), atol=tol, rtol=tol)


ADAFACTOR = {
    # big_vision defaults: bf16 momentum before the lr, clipping, largest-two factoring, independent decay
    "v2": dict(preset="adafactor_v2", lr=1e-2, weight_decay=1e-4),
    "v2-no-momentum-coupled-maximize": dict(
        preset="adafactor_v2", lr=1e-2, beta1=None, weight_decay=0.1, weight_decay_mode="coupled", maximize=True
    ),
    "v2-fp32-momentum-l2-last-two": dict(
        preset="adafactor_v2",
        lr=1e-2,
        momentum_dtype="float32",
        weight_decay=1e-2,
        weight_decay_mode="l2",
        factor_dims="last_two",
        clip_threshold=None,
    ),
    # relative step, parameter scale, momentum after the lr, decay at the effective step (r = λ α_t)
    "hf-momentum-wd": dict(preset="hf", beta1=0.9, weight_decay=1e-2),
    # clamp epsilon, decay as a factor
    "torch-wd": dict(preset="torch", weight_decay=1e-2),
    # unfactored, parameter scale, corrected (lr²) decay
    "palm": dict(preset="palm"),
    # corrected decay at the effective step: r = (λ/α) α_t², computed inside the graph
    "t5-corrected-step": dict(preset="t5", weight_decay=1e-2, weight_decay_mode="corrected", weight_decay_lr="step"),
}


@pytest.mark.parametrize("knobs", ADAFACTOR.values(), ids=ADAFACTOR.keys())
def test_adafactor_compiled_equals_for_loop(knobs):
    def build(ps, impl):
        return hf_optim.Adafactor(ps, implementation=impl, **knobs)

    assert_same(run(build, "compiled"), run(build, "for-loop"))


ADAM = {
    "atan2": lambda ps, impl: hf_optim.AdamAtan2(ps, lr=1e-2, weight_decay=0.1, b=2.0, implementation=impl),
    "radam-l2": lambda ps, impl: hf_optim.RAdam(ps, lr=1e-2, weight_decay=1e-2, implementation=impl),
    "radam-coupled-maximize-torch-eps": lambda ps, impl: hf_optim.RAdam(
        ps,
        lr=1e-2,
        weight_decay=1e-2,
        weight_decay_mode="coupled",
        maximize=True,
        eps_mode="torch",
        implementation=impl,
    ),
}


@pytest.mark.parametrize("build", ADAM.values(), ids=ADAM.keys())
def test_adam_family_compiled_equals_for_loop(build):
    assert_same(run(build, "compiled"), run(build, "for-loop"))


@pytest.mark.parametrize(("first", "second"), [("compiled", "for-loop"), ("for-loop", "compiled")])
def test_state_dict_round_trip_across_implementations(first, second):
    """A checkpoint of one implementation resumes in the other; the result equals an uninterrupted for-loop run."""
    knobs = ADAFACTOR["v2"]  # the same graph as test_adafactor_compiled_equals_for_loop[v2]: no new compilation
    expected = run(lambda ps, impl: hf_optim.Adafactor(ps, implementation=impl, **knobs), "for-loop")

    params = make_params()
    opt = hf_optim.Adafactor(params, implementation=first, **knobs)
    peaks = [g["lr"] for g in opt.param_groups]
    gen = torch.Generator().manual_seed(1)
    for t in range(STEPS):
        if t == 3:  # checkpoint, then resume with the other implementation
            buffer = io.BytesIO()
            torch.save({"opt": opt.state_dict(), "params": [p.detach() for p in params]}, buffer)
            buffer.seek(0)
            checkpoint = torch.load(buffer, weights_only=True)
            params = [p.clone().requires_grad_(True) for p in checkpoint["params"]]
            opt = hf_optim.Adafactor(params, implementation=second, **knobs)
            opt.load_state_dict(checkpoint["opt"])
            assert opt.state[params[0]]["exp_avg"].dtype == torch.bfloat16
        for group, peak in zip(opt.param_groups, peaks):
            group["lr"] = peak * (0.4 + 0.1 * t)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    assert_same((params, opt), expected)


def test_auto_compiles_only_large_groups():
    small = [torch.zeros(64, 64)]
    large = [torch.zeros(_compiled.AUTO_MIN_NUMEL)]
    assert resolve("auto", small) == "for-loop"
    assert resolve("auto", large) == "compiled"
    assert resolve("foreach", large) == "foreach"
    assert hf_optim.AdamAtan2(small)._resolve(hf_optim.AdamAtan2(small).param_groups[0], small) == "foreach"
    assert hf_optim.RAdam(large)._resolve(hf_optim.RAdam(large).param_groups[0], large) == "compiled"
    assert hf_optim.AdamW(large)._resolve(hf_optim.AdamW(large).param_groups[0], large) == "fused"


def test_failed_compilation_warns_once_and_falls_back_to_eager(monkeypatch):
    """Without a working compiler (simulated: the backend raises), steps stay correct and `auto` stops compiling."""
    monkeypatch.setattr(_compiled, "_BROKEN", {})

    def broken(fn, key):
        def call(*args):
            raise torch._dynamo.exc.InternalTorchDynamoError("no C++ compiler")

        return call

    monkeypatch.setattr(_compiled, "compiled_for", broken)

    def build(ps, impl):
        return hf_optim.RAdam(ps, lr=1e-2, implementation=impl)

    with pytest.warns(RuntimeWarning, match="torch.compile failed") as record:
        actual = run(build, "compiled")
    assert len([w for w in record if "torch.compile failed" in str(w.message)]) == 1
    assert_same(actual, run(build, "for-loop"))
    assert _compiled.compile_broken("cpu")
    assert resolve("auto", [torch.zeros(_compiled.AUTO_MIN_NUMEL)]) == "for-loop"


def test_maths_errors_are_not_swallowed(monkeypatch):
    """Only compilation failures fall back; an error of the maths itself propagates."""
    monkeypatch.setattr(_compiled, "_BROKEN", {})

    def broken(fn, key):
        def call(*args):
            raise RuntimeError("shape mismatch")

        return call

    monkeypatch.setattr(_compiled, "compiled_for", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        run(lambda ps, impl: hf_optim.AdamAtan2(ps, implementation=impl), "compiled", steps=range(1))


@pytest.mark.parametrize(
    "cls, kwargs",
    [
        (hf_optim.RAdam, {}),
        (hf_optim.AdamAtan2, {}),
        (hf_optim.Adafactor, dict(min_dim_size_to_factor=1)),
    ],
    ids=["radam", "adam_atan2", "adafactor"],
)
def test_inductor_corner_stays_eager(cls, kwargs):
    """Inductor (torch 2.13, CPU) returns a 0-d float64 parameter unchanged from the Adam-family graph and NaN from
    the Adafactor graph (0-d float32/bfloat16 and float64 of shape (1,) or (3,) are fine: measured, see
    ``_compiled.inductor_ok``). Such tensors take the eager path, so ``compiled`` equals the for-loop on them."""
    x0 = torch.tensor(1.5, dtype=torch.float64)
    results = []
    for impl in ("for-loop", "compiled"):
        p = torch.nn.Parameter(x0.clone())
        opt = cls([p], lr=1e-2, implementation=impl, **kwargs)
        for t in range(3):
            p.grad = torch.tensor(0.5 + t, dtype=torch.float64)
            opt.step()
        results.append(p.detach())
    assert not torch.equal(results[1], x0) and torch.isfinite(results[1])
    torch.testing.assert_close(results[1], results[0], atol=1e-12, rtol=0)
    assert not _compiled.inductor_ok(torch.zeros((), dtype=torch.float64))
    assert _compiled.inductor_ok(torch.zeros((), dtype=torch.float32))
    assert _compiled.inductor_ok(torch.zeros((1,), dtype=torch.float64))
