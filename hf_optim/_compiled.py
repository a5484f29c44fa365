r"""Compiled (``torch.compile`` / Inductor) step functions for the update rules torch has no fused kernel for.

An optimizer step is a streaming pass over memory; eager PyTorch (even ``foreach``) makes one pass per elementwise
op and per temporary, which is why eager Adafactor is several times slower than ``torch.optim.AdamW(fused=True)``.
Inductor fuses each parameter's elementwise chain into a few loops (reductions + one pointwise write-back), on CPU
(generated C++, vectorised, compiled with the system C++ compiler) and on GPU (Triton).

Design (measured on CPU, see ``docs/benchmarks.md``):

* **One compiled function per (shape, dtype, flags) "shape class"**, applied to a *list* of same-shape tensors.
  Parameters are grouped by shape with :func:`group_by_shape`; a LLaMA has ~5 shape classes whatever its depth, so
  compile time does not grow with the number of layers past the first model of a given width... but Dynamo unrolls
  the Python loop over the list, so the code size grows with the *count* of each class; ``chunk`` bounds it.
* **Hyperparameters that change between steps are 0-d tensors** (lr, beta2_t, the decay rate, bias corrections):
  a Python float would be baked into the graph as a constant and recompile every step.
* ``dynamic=False``: shapes are static per class, so Inductor can fully specialise and vectorise the loops.
* The functions are pure tensor code with in-place updates (``copy_`` / ``mul_``/``add_``); called uncompiled they
  are the reference ("for-loop") implementation of the same maths, which is how tests compare the two paths.

API (what ``adafactor.py`` and ``adam.py`` call)::

    adafactor_step(params, grads, rows, cols, vs, momenta, *, lr, beta2, decay, beta1, eps1, clip, param_scale_eps2)
    adam_atan2_step(params, grads, exp_avgs, exp_avg_sqs, *, lr, beta1, beta2, bc1, bc2, decay, a, b)
    radam_step(params, grads, exp_avgs, exp_avg_sqs, *, lr_sgd, lr_adapt, beta1, beta2, bc2, decay, l2)

Each argument list holds tensors of one shape class; scalar hyperparameters marked *tensor* must be 0-d float32
tensors on the parameters' device.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch

Tensor = torch.Tensor


# --------------------------------------------------------------------------------------------------------------------
# Adafactor
# --------------------------------------------------------------------------------------------------------------------
def _adafactor_one(
    p: Tensor,
    g: Tensor,
    row: Tensor | None,
    col: Tensor | None,
    v: Tensor | None,
    m: Tensor | None,
    lr: Tensor,
    beta2: Tensor,
    decay: Tensor,
    beta1: float | None,
    eps1: float,
    clip: float | None,
    param_scale_eps2: float | None,
) -> None:
    r"""One parameter's Adafactor update, in fp32, written back in the parameter's dtype.

    .. math::
        G_2 = g^2 + \epsilon_1,\quad
        R \leftarrow \beta_{2,t} R + (1-\beta_{2,t})\,\mathrm{mean}_{-1} G_2,\quad
        C \leftarrow \beta_{2,t} C + (1-\beta_{2,t})\,\mathrm{mean}_{-2} G_2

        u = g \,/\, \sqrt{R\,C / \mathrm{mean}(R)}\ \ (\text{or } g/\sqrt{V} \text{ unfactored}),\quad
        u \leftarrow u / \max(1, \mathrm{RMS}(u)/d)

        m \leftarrow \beta_1 m + (1-\beta_1) u,\ u \leftarrow m \ (\text{if } \beta_1),\quad
        x \leftarrow x\,(1 - \text{decay}) - \alpha_t\,\max(\epsilon_2, \mathrm{RMS}(x))\,u
    """
    gf = g.float()
    pf = p.float()
    g2 = gf * gf + eps1
    one_minus_beta2 = 1.0 - beta2
    if row is not None and col is not None:
        row.lerp_(g2.mean(dim=-1), one_minus_beta2)
        col.lerp_(g2.mean(dim=-2), one_minus_beta2)
        # 1/v̂ = (mean(R)/R) ⊗ (1/C): two small vectors instead of an n×m temporary.
        inv_row = (row.mean(dim=-1, keepdim=True) / row).unsqueeze(-1)
        inv_col = col.reciprocal().unsqueeze(-2)
        scale_row, scale_col = inv_row.sqrt(), inv_col.sqrt()
        if clip is not None:
            # RMS(u)² = mean(g²/v̂) as a pure reduction, so the n×m update is never stored and re-read.
            ms_u = (gf * gf * inv_row * inv_col).mean()
            scale_row = scale_row / torch.clamp(ms_u.sqrt() / clip, min=1.0)
        update = gf * scale_row * scale_col
    else:
        assert v is not None
        v.lerp_(g2, one_minus_beta2)
        update = gf * v.rsqrt()
        if clip is not None:
            update = update / torch.clamp(update.square().mean().sqrt() / clip, min=1.0)
    if beta1 is not None:
        assert m is not None
        new_m = m.float().lerp(update, 1.0 - beta1)
        m.copy_(new_m)
        update = new_m
    step_size = lr
    if param_scale_eps2 is not None:
        step_size = lr * torch.clamp(pf.square().mean().sqrt(), min=param_scale_eps2)
    p.copy_(pf * (1.0 - decay) - step_size * update)


def adafactor_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    rows: Sequence[Tensor | None],
    cols: Sequence[Tensor | None],
    vs: Sequence[Tensor | None],
    momenta: Sequence[Tensor | None],
    *,
    lr: Tensor,
    beta2: Tensor,
    decay: Tensor,
    beta1: float | None,
    eps1: float,
    clip: float | None,
    param_scale_eps2: float | None = None,
) -> None:
    """Adafactor update of a list of parameters (see :func:`_adafactor_one`); ``lr``, ``beta2``, ``decay`` 0-d."""
    for i in range(len(params)):
        _adafactor_one(params[i], grads[i], rows[i], cols[i], vs[i], momenta[i], lr, beta2, decay,
                       beta1, eps1, clip, param_scale_eps2)


# --------------------------------------------------------------------------------------------------------------------
# Adam-atan2 and RAdam
# --------------------------------------------------------------------------------------------------------------------
def adam_atan2_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    *,
    lr: Tensor,
    beta1: float,
    beta2: float,
    bc1: Tensor,
    bc2_sqrt: Tensor,
    decay: Tensor,
    a: float,
    b: float,
) -> None:
    r"""Adam-atan2 (Everett et al. 2024): :math:`x \leftarrow x(1-\text{decay}) - \alpha_t\,a\,
    \mathrm{atan2}(\hat m, b\sqrt{\hat v})` with :math:`\hat m = m/bc_1`, :math:`\sqrt{\hat v} = \sqrt v / \sqrt{bc_2}`.
    """
    for i in range(len(params)):
        p, g, m, v = params[i], grads[i], exp_avgs[i], exp_avg_sqs[i]
        gf = g.float()
        m.lerp_(gf, 1.0 - beta1)
        v.mul_(beta2).addcmul_(gf, gf, value=1.0 - beta2)
        update = torch.atan2(m / bc1, b * (v.sqrt() / bc2_sqrt))
        p.copy_(p.float() * (1.0 - decay) - (lr * a) * update)


def radam_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    *,
    lr_sgd: Tensor,
    lr_adapt: Tensor,
    beta1: float,
    beta2: float,
    bc2_sqrt: Tensor,
    eps: float,
    decay: Tensor,
    l2: float,
) -> None:
    r"""RAdam (Liu et al. 2019) with the rectification folded into two step sizes computed on the host:

    :math:`x \leftarrow x(1-\text{decay}) - \alpha_{sgd} m - \alpha_{adapt}\, m / (\sqrt{v}/\sqrt{bc_2} + \epsilon)`
    where exactly one of :math:`\alpha_{sgd} = \alpha_t/bc_1` (while :math:`\rho_t \le 5`) and
    :math:`\alpha_{adapt} = \alpha_t r_t / bc_1` is non-zero, so one compiled graph serves every step.
    ``l2`` adds :math:`\lambda x` to the gradient first (torch ``RAdam(weight_decay)``).
    """
    for i in range(len(params)):
        p, g, m, v = params[i], grads[i], exp_avgs[i], exp_avg_sqs[i]
        pf = p.float()
        gf = g.float()
        if l2 != 0.0:
            gf = gf + l2 * pf
        m.lerp_(gf, 1.0 - beta1)
        v.mul_(beta2).addcmul_(gf, gf, value=1.0 - beta2)
        adapt = m / (v.sqrt() / bc2_sqrt + eps)
        p.copy_(pf * (1.0 - decay) - lr_sgd * m - lr_adapt * adapt)


# --------------------------------------------------------------------------------------------------------------------
# Compilation helpers
# --------------------------------------------------------------------------------------------------------------------
def group_by_shape(tensors: Sequence[Tensor], chunk: int = 0) -> list[list[int]]:
    """Indices of ``tensors`` grouped by (shape, dtype, device), in first-seen order; groups split into ``chunk``."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((tuple(t.shape), t.dtype, t.device), []).append(i)
    out: list[list[int]] = []
    for idx in groups.values():
        if chunk > 0:
            out += [idx[j:j + chunk] for j in range(0, len(idx), chunk)]
        else:
            out.append(idx)
    return out


@functools.cache
def compiled(fn: Callable[..., None]) -> Callable[..., None]:
    """``torch.compile(fn)`` with static shapes; cached so every optimizer shares one compiled function per rule."""
    return torch.compile(fn, dynamic=False, fullgraph=True)
