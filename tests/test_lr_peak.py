"""``lr_peak`` follows the scheduler: ``independent`` decay removes λ per step at the schedule's peak, whatever lr the
optimizer was built with; an lr above the peak warns once per group.

Reference: the definition ``x <- x (1 - (lr_t / lr_peak) λ)`` with lr_peak = the schedule's maximum lr, measured with
zero gradients (the update is 0, only the decay moves the weights) on float64 parameters.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import hf_optim

LAMBDA = 1e-4
#: every class with its knobs for a zero-gradient step that moves the weights only by decay
CLASSES = {
    "Adam": {},
    "AdamW": {},
    "RAdam": {},
    "AdamAtan2": {},
    "SGDW": {"momentum": 0.9},
    "AdaGrad": {},
    "RMSProp": {},
    "Adafactor": {},
}


def _opt(name: str, lr: float, mode: str = "independent"):
    x = torch.nn.Parameter(torch.full((4, 3), 2.0, dtype=torch.float64))
    cls = getattr(hf_optim, name)
    return x, cls([x], lr=lr, weight_decay=LAMBDA, weight_decay_mode=mode, **CLASSES[name])


def _decay_step(opt, x) -> float:
    """One zero-gradient step; the fraction of the weight it removed."""
    before = x.detach().clone()
    x.grad = torch.zeros_like(x)
    opt.step()
    return float(1.0 - (x.detach() / before).mean())


@pytest.mark.parametrize("name", list(CLASSES))
def test_one_cycle_peak_decays_lambda(name):
    x, opt = _opt(name, lr=1e-3)
    total = 20
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=1e-2, total_steps=total, pct_start=0.25, cycle_momentum=name not in ("Adafactor", "AdaGrad")
    )
    rates, lrs = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the lr never exceeds the recorded peak: no warning
        for _ in range(total):
            lrs.append(opt.param_groups[0]["lr"])
            rates.append(_decay_step(opt, x))
            sched.step()
    peak = max(range(total), key=lambda t: lrs[t])
    assert lrs[peak] == pytest.approx(1e-2)
    assert rates[peak] == pytest.approx(LAMBDA, rel=1e-4)  # not 10·λ (lr_peak = the construction lr 1e-3)
    for t in range(total):  # and every step follows lr_t / max_lr
        assert rates[t] == pytest.approx(LAMBDA * lrs[t] / 1e-2, rel=1e-4)
    assert opt.param_groups[0]["lr_peak"] == pytest.approx(1e-2)


@pytest.mark.parametrize("mode", ["independent", "corrected"])
def test_lr_raised_above_peak_warns_once_per_group(mode):
    x, opt = _opt("AdamW", lr=1e-3, mode=mode)
    opt.param_groups[0]["lr"] = 1e-1
    with pytest.warns(UserWarning, match="exceeds the group's peak lr"):
        rate = _decay_step(opt, x)
    factor = 100.0 if mode == "independent" else 100.0 * 1e-1  # (lr/peak)·λ, and (lr²/peak)·λ
    assert rate == pytest.approx(factor * LAMBDA, rel=1e-4)  # the documented rule, not clamped
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _decay_step(opt, x)  # once per group


def test_no_warning_for_coupled_decay_or_lower_lr():
    x, opt = _opt("AdamW", lr=1e-3, mode="coupled")
    opt.param_groups[0]["lr"] = 1e-1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _decay_step(opt, x)
    y, other = _opt("AdamW", lr=1e-3)
    other.param_groups[0]["lr"] = 5e-4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _decay_step(other, y) == pytest.approx(0.5 * LAMBDA, rel=1e-4)


def test_lambda_scheduler_keeps_the_construction_peak():
    """LambdaLR (the Trainer's schedulers) records initial_lr = the construction lr: warm-up decays less than λ."""
    x, opt = _opt("Adafactor", lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / 4))
    rates = []
    for _ in range(6):
        rates.append(_decay_step(opt, x))
        sched.step()
    assert rates[0] == pytest.approx(0.25 * LAMBDA, rel=1e-4)
    assert rates[5] == pytest.approx(LAMBDA, rel=1e-4)


def test_cyclic_lr_built_at_its_max_lr():
    """CyclicLR keeps max_lr on the scheduler only: built with lr = max_lr, the peak is right."""
    x, opt = _opt("SGDW", lr=1e-2)
    sched = torch.optim.lr_scheduler.CyclicLR(opt, base_lr=1e-3, max_lr=1e-2, step_size_up=3)
    rates, lrs = [], []
    for _ in range(7):
        lrs.append(opt.param_groups[0]["lr"])
        rates.append(_decay_step(opt, x))
        sched.step()
    for lr, rate in zip(lrs, rates):
        assert rate == pytest.approx(LAMBDA * lr / 1e-2, rel=1e-4)
