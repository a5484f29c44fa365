r"""The one Adam-family update rule and its implementations (for-loop, foreach, torch's fused kernels, compiled).

Every member of the family (Adam, AdamW, the ``tf`` epsilon, RAdam's rectification, Adam-atan2) is the same step

.. math::
    x \leftarrow x - \alpha_t \, F\bigl(m_t,\; \sigma_t \sqrt{v_t} + \epsilon_t\bigr),
    \qquad F(m, d) = m / d \;\text{ or }\; \operatorname{atan2}(m, d),

with per-step scalars :math:`(\alpha_t, \sigma_t, \epsilon_t)` computed by :meth:`Rule.coefficients` from the bias
corrections. Folding the bias corrections into scalars (``atan2(y, x) = atan2(c y, c x)`` for ``c > 0``) is what lets
one kernel serve every variant. RAdam's un-rectified momentum step ``x -= α_t m_t`` is marked by the explicit flag
:attr:`Coefficients.momentum_only`, never by a value of :math:`\sigma_t`: Adam-atan2 with ``b = 0`` has
:math:`\sigma_t = 0` and must still take ``atan2(m, 0) = ±π/2``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ...decay import coupled_equivalent

TensorLists = tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor], list[Tensor]]


class Coefficients(NamedTuple):
    """The per-step scalars of ``x -= alpha·F(m, sigma·sqrt(v) + eps)``."""

    alpha: float
    sigma: float
    eps: float
    #: RAdam while ρ_t <= 5: the plain momentum step ``x -= alpha·m`` (sigma and eps unused). Only RAdam sets it.
    momentum_only: bool = False


@dataclass(frozen=True, slots=True)
class Rule:
    """The scalars of one group for one step (plain floats: no host syncs)."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    eps_mode: str  # "torch" | "tf"
    weight_decay: float
    weight_decay_mode: str
    lr_peak: float
    maximize: bool
    rectify: bool = False  # RAdam
    atan2: tuple[float, float] | None = None  # Adam-atan2's (a, b)

    @property
    def l2(self) -> float:
        return self.weight_decay if self.weight_decay_mode == "l2" else 0.0

    @property
    def coupled_wd(self) -> float:
        """torch-AdamW ``weight_decay`` equal to this step's decoupled decay (0 for ``l2``)."""
        return coupled_equivalent(self.weight_decay_mode, self.weight_decay, self.lr, self.lr_peak)

    def coefficients(self, step: float) -> Coefficients:
        r"""``(α_t, σ_t, ε_t, momentum_only)`` for ``x -= α_t F(m_t, σ_t sqrt(v_t) + ε_t)`` at step ``t`` (1-based)."""
        bc1 = 1.0 - self.beta1**step
        bc2 = 1.0 - self.beta2**step
        if self.atan2 is not None:
            a, b = self.atan2
            # a·atan2(m/bc1, b·sqrt(v/bc2)) = a·atan2(m, (b·bc1/sqrt(bc2))·sqrt(v)); b = 0 gives σ_t = 0, which is
            # still an atan2 step (a·π/2·sign(m)), hence the separate momentum_only flag.
            return Coefficients(self.lr * a, b * bc1 / math.sqrt(bc2), 0.0)
        rect = 1.0
        if self.rectify:
            rho_inf = 2.0 / (1.0 - self.beta2) - 1.0
            rho_t = rho_inf - 2.0 * step * self.beta2**step / bc2
            if rho_t <= 5.0:  # variance of the adaptive lr is intractable: plain momentum step
                return Coefficients(self.lr / bc1, 0.0, 1.0, momentum_only=True)
            rect = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
        if self.eps_mode == "tf":  # lr·sqrt(bc2)/bc1 · m / (sqrt(v) + ε̂)
            return Coefficients(self.lr * rect * math.sqrt(bc2) / bc1, 1.0, self.eps)
        return Coefficients(self.lr * rect / bc1, 1.0 / math.sqrt(bc2), self.eps)  # (m/bc1) / (sqrt(v/bc2) + ε)


def _prepare_grads(params: list[Tensor], grads: list[Tensor], rule: Rule, foreach: bool) -> list[Tensor]:
    if rule.maximize:
        grads = torch._foreach_neg(grads) if foreach else [-g for g in grads]
    if rule.l2:
        grads = (
            torch._foreach_add(grads, params, alpha=rule.l2)
            if foreach
            else [g.add(p, alpha=rule.l2) for g, p in zip(grads, params)]
        )
    return grads


def for_loop(params, grads, exp_avgs, exp_avg_sqs, steps, rule: Rule) -> None:
    """Reference implementation: one tensor at a time, in the parameter's dtype (float64-capable)."""
    grads = _prepare_grads(params, grads, rule, foreach=False)
    decay = rule.lr * rule.coupled_wd
    for p, g, m, v, s in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        if decay:
            p.mul_(1.0 - decay)
        s += 1
        alpha, sigma, eps, momentum_only = rule.coefficients(s.item())
        m.lerp_(g, 1.0 - rule.beta1)
        v.mul_(rule.beta2).addcmul_(g, g, value=1.0 - rule.beta2)
        if momentum_only:
            p.add_(m, alpha=-alpha)
            continue
        denom = v.sqrt().mul_(sigma)
        if rule.atan2 is not None:
            p.add_(torch.atan2(m, denom), alpha=-alpha)
        else:
            p.addcdiv_(m, denom.add_(eps), value=-alpha)


def foreach(params, grads, exp_avgs, exp_avg_sqs, steps, rule: Rule) -> None:
    """Multi-tensor implementation of :func:`for_loop` (same maths, ``torch._foreach_*`` ops)."""
    grads = _prepare_grads(params, grads, rule, foreach=True)
    decay = rule.lr * rule.coupled_wd
    if decay:
        torch._foreach_mul_(params, 1.0 - decay)
    torch._foreach_add_(steps, 1)
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - rule.beta1)
    torch._foreach_mul_(exp_avg_sqs, rule.beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - rule.beta2)
    coefs = [rule.coefficients(s.item()) for s in steps]
    # RAdam's first steps are plain momentum steps; everything else shares the foreach path.
    plain = [i for i, c in enumerate(coefs) if c.momentum_only]
    for i in plain:
        params[i].add_(exp_avgs[i], alpha=-coefs[i].alpha)
    if plain:
        keep = [i for i, c in enumerate(coefs) if not c.momentum_only]
        if not keep:
            return
        params, exp_avgs, exp_avg_sqs = ([x[i] for i in keep] for x in (params, exp_avgs, exp_avg_sqs))
        coefs = [coefs[i] for i in keep]
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_mul_(denom, [c.sigma for c in coefs])
    if rule.atan2 is not None:
        for p, m, d, c in zip(params, exp_avgs, denom, coefs):
            p.add_(torch.atan2(m, d), alpha=-c.alpha)
        return
    torch._foreach_add_(denom, [c.eps for c in coefs])
    torch._foreach_addcdiv_(params, exp_avgs, denom, [-c.alpha for c in coefs])


def fused(params, grads, exp_avgs, exp_avg_sqs, steps, rule: Rule) -> None:
    """torch's fused Adam/AdamW kernels, reparametrized to serve every decay mode and both epsilon modes.

    Decoupled modes pass ``weight_decay = coupled_equivalent(...)`` to ``_fused_adamw_``; ``l2`` uses ``_fused_adam_``.
    The ``tf`` epsilon equals the torch form with ``ε_t = ε̂ / sqrt(1 - β2^t)``, which needs the step count on the
    host: read once per group (one sync), split by step only if parameters of the group have different counts.
    The kernels take tensors of one device and one dtype per call, so each bucket is split by (device, dtype) as
    ``torch.optim.Adam``'s fused path does (a group may mix fp32 and fp64 parameters, or devices).
    """
    if rule.rectify or rule.atan2 is not None:
        raise ValueError("implementation='fused' supports Adam/AdamW only (no RAdam rectification or atan2).")
    torch._foreach_add_(steps, 1)
    if rule.weight_decay_mode == "l2":
        kernel, wd = torch._fused_adam_, rule.weight_decay
    else:
        kernel, wd = torch._fused_adamw_, rule.coupled_wd
    lists = (params, grads, exp_avgs, exp_avg_sqs)
    buckets: list[tuple[float, TensorLists]] = []
    if rule.eps_mode == "tf":
        counts = torch.stack(steps).tolist() if len(steps) > 1 else [steps[0].item()]
        if all(c == counts[0] for c in counts):
            buckets.append((counts[0], (*lists, steps)))
        else:
            by_step: dict[float, list[int]] = {}
            for i, c in enumerate(counts):
                by_step.setdefault(c, []).append(i)
            for c, idx in by_step.items():
                buckets.append((c, tuple([x[i] for i in idx] for x in (*lists, steps))))  # type: ignore[misc]
    else:
        buckets.append((0.0, (*lists, steps)))
    for count, bucket in buckets:
        eps = rule.eps / math.sqrt(1.0 - rule.beta2**count) if rule.eps_mode == "tf" else rule.eps
        for p, g, m, v, s in _by_device_and_dtype(bucket):
            kernel(
                p,
                g,
                m,
                v,
                [],
                s,
                amsgrad=False,
                lr=rule.lr,
                beta1=rule.beta1,
                beta2=rule.beta2,
                weight_decay=wd,
                eps=eps,
                maximize=rule.maximize,
                grad_scale=None,
                found_inf=None,
            )


def _by_device_and_dtype(lists: TensorLists) -> list[TensorLists]:
    """Split parallel tensor lists into runs of one (device, dtype) of the parameters, with torch's own helper (the
    one ``torch.optim.Adam`` uses before its fused kernels), falling back to a Python grouping if it changes."""
    if len({(p.device, p.dtype) for p in lists[0]}) <= 1:
        return [lists]
    try:
        grouped = torch.optim.Optimizer._group_tensors_by_device_and_dtype(list(lists))  # type: ignore[arg-type]
        return [tuple(tensors) for tensors, _ in grouped.values()]  # type: ignore[misc]
    except (AttributeError, TypeError):  # a private torch helper: keep working if its signature moves
        by_key: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, p in enumerate(lists[0]):
            by_key.setdefault((p.device, p.dtype), []).append(i)
        return [tuple([x[i] for i in idx] for x in lists) for idx in by_key.values()]  # type: ignore[misc]


def compiled(params, grads, exp_avgs, exp_avg_sqs, steps, rule: Rule) -> None:
    """:func:`for_loop`'s maths as one ``torch.compile`` graph per bucket (:mod:`hf_optim._compiled`): the per-step
    scalars ``(α_t, σ_t, ε_t)`` and the decay rate enter as 0-d tensors, so a graph is compiled once per bucket."""
    from ... import _compiled

    lists = (params, grads, exp_avgs, exp_avg_sqs, steps)
    keep = [i for i, p in enumerate(params) if _compiled.inductor_ok(p)]
    if len(keep) < len(params):  # tensors Inductor mishandles (0-d float64) take the eager for-loop
        kept = set(keep)
        for_loop(*([x[i] for i in range(len(params)) if i not in kept] for x in lists), rule)
        params, grads, exp_avgs, exp_avg_sqs, steps = ([x[i] for i in keep] for x in lists)
    if not params:
        return
    counts = [s.item() + 1.0 for s in steps]  # `step` lives on the CPU: no device sync
    decay = rule.lr * rule.coupled_wd
    k = dict(maximize=rule.maximize, l2=rule.l2, beta1=rule.beta1, beta2=rule.beta2, atan2=rule.atan2 is not None)
    for idx in _compiled.buckets(params, counts):
        pick = lambda seq, idx=idx: [seq[i] for i in idx]
        p0 = params[idx[0]]
        cd, dev = _compiled.compute_dtype(p0.dtype), p0.device
        coefs = rule.coefficients(counts[idx[0]])
        # In the graph only the division branch reads sigma == 0 as RAdam's momentum step (momentum_only implies
        # sigma == 0); the atan2 branch never does, so AdamAtan2's b = 0 stays an atan2 step there too.
        alpha, sigma, eps = (torch.tensor(c, dtype=cd, device=dev) for c in (coefs.alpha, coefs.sigma, coefs.eps))
        args = (
            pick(params),
            pick(grads),
            pick(exp_avgs),
            pick(exp_avg_sqs),
            alpha,
            sigma,
            eps,
            torch.tensor(decay, dtype=cd, device=dev),
            k,
        )
        key = (
            tuple((tuple(params[i].shape), params[i].dtype, grads[i].dtype) for i in idx),
            str(dev),
            tuple(sorted(k.items())),
        )
        # The eager fallback counts the step itself; the compiled path counts it after the graph ran.
        _compiled.run_or_fallback(
            _compiled.adam_step,
            key,
            dev.type,
            args,
            lambda pick=pick: for_loop(pick(params), pick(grads), pick(exp_avgs), pick(exp_avg_sqs), pick(steps), rule),
        )
    for s, c in zip(steps, counts):
        if s.item() < c:
            s += 1


KERNELS: dict[str, Callable[..., None]] = {
    "for-loop": for_loop,
    "foreach": foreach,
    "fused": fused,
    "compiled": compiled,
}
