r"""The one Adam-family update rule and its implementations (for-loop, foreach, torch's fused kernels, compiled).

Every member of the family (Adam, AdamW, the ``tf`` epsilon, RAdam's rectification, Adam-atan2) is the same step

.. math::
    x \leftarrow x - \alpha_t \, F\bigl(m_t,\; \sigma_t \sqrt{v_t} + \epsilon_t\bigr),
    \qquad F(m, d) = m / d \;\text{ or }\; \operatorname{atan2}(m, d),

with per-step scalars :math:`(\alpha_t, \sigma_t, \epsilon_t)` computed by :meth:`Rule.coefficients` from the bias
corrections. Folding the bias corrections into scalars (``atan2(y, x) = atan2(c y, c x)`` for ``c > 0``) is what lets
one kernel serve every variant. :math:`\sigma_t = 0` marks RAdam's un-rectified momentum step ``x -= α_t m_t``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .decay import coupled_equivalent

TensorLists = tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor], list[Tensor]]


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

    def coefficients(self, step: float) -> tuple[float, float, float]:
        r"""``(α_t, σ_t, ε_t)`` for ``x -= α_t F(m_t, σ_t sqrt(v_t) + ε_t)`` at step ``t`` (1-based)."""
        bc1 = 1.0 - self.beta1**step
        bc2 = 1.0 - self.beta2**step
        if self.atan2 is not None:
            a, b = self.atan2
            # a·atan2(m/bc1, b·sqrt(v/bc2)) = a·atan2(m, (b·bc1/sqrt(bc2))·sqrt(v)).
            return self.lr * a, b * bc1 / math.sqrt(bc2), 0.0
        rect = 1.0
        if self.rectify:
            rho_inf = 2.0 / (1.0 - self.beta2) - 1.0
            rho_t = rho_inf - 2.0 * step * self.beta2**step / bc2
            if rho_t <= 5.0:  # variance of the adaptive lr is intractable: plain momentum step
                return self.lr / bc1, 0.0, 1.0
            rect = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
        if self.eps_mode == "tf":  # lr·sqrt(bc2)/bc1 · m / (sqrt(v) + ε̂)
            return self.lr * rect * math.sqrt(bc2) / bc1, 1.0, self.eps
        return self.lr * rect / bc1, 1.0 / math.sqrt(bc2), self.eps  # (m/bc1) / (sqrt(v/bc2) + ε)


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
        alpha, sigma, eps = rule.coefficients(s.item())
        m.lerp_(g, 1.0 - rule.beta1)
        v.mul_(rule.beta2).addcmul_(g, g, value=1.0 - rule.beta2)
        if sigma == 0.0:
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
    # RAdam's first steps (sigma == 0) are plain momentum steps; everything else shares the foreach path.
    plain = [i for i, c in enumerate(coefs) if c[1] == 0.0]
    for i in plain:
        params[i].add_(exp_avgs[i], alpha=-coefs[i][0])
    if plain:
        keep = [i for i, c in enumerate(coefs) if c[1] != 0.0]
        if not keep:
            return
        params, exp_avgs, exp_avg_sqs = ([x[i] for i in keep] for x in (params, exp_avgs, exp_avg_sqs))
        coefs = [coefs[i] for i in keep]
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_mul_(denom, [c[1] for c in coefs])
    if rule.atan2 is not None:
        for p, m, d, c in zip(params, exp_avgs, denom, coefs):
            p.add_(torch.atan2(m, d), alpha=-c[0])
        return
    torch._foreach_add_(denom, [c[2] for c in coefs])
    torch._foreach_addcdiv_(params, exp_avgs, denom, [-c[0] for c in coefs])


def fused(params, grads, exp_avgs, exp_avg_sqs, steps, rule: Rule) -> None:
    """torch's fused Adam/AdamW kernels, reparametrized to serve every decay mode and both epsilon modes.

    Decoupled modes pass ``weight_decay = coupled_equivalent(...)`` to ``_fused_adamw_``; ``l2`` uses ``_fused_adam_``.
    The ``tf`` epsilon equals the torch form with ``ε_t = ε̂ / sqrt(1 - β2^t)``, which needs the step count on the
    host: read once per group (one sync), split by step only if parameters of the group have different counts.
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
    for count, (p, g, m, v, s) in buckets:
        eps = rule.eps / math.sqrt(1.0 - rule.beta2**count) if rule.eps_mode == "tf" else rule.eps
        kernel(
            p, g, m, v, [], s, amsgrad=False, lr=rule.lr, beta1=rule.beta1, beta2=rule.beta2,
            weight_decay=wd, eps=eps, maximize=rule.maximize, grad_scale=None, found_inf=None,
        )


def compiled(params, grads, exp_avgs, exp_avg_sqs, steps, rule: Rule) -> None:
    """:func:`for_loop`'s maths as one ``torch.compile`` graph per bucket (:mod:`hf_optim._compiled`): the per-step
    scalars ``(α_t, σ_t, ε_t)`` and the decay rate enter as 0-d tensors, so a graph is compiled once per bucket."""
    from . import _compiled

    counts = [s.item() + 1.0 for s in steps]  # `step` lives on the CPU: no device sync
    decay = rule.lr * rule.coupled_wd
    k = dict(maximize=rule.maximize, l2=rule.l2, beta1=rule.beta1, beta2=rule.beta2, atan2=rule.atan2 is not None)
    for idx in _compiled.buckets(params, counts):
        pick = lambda seq: [seq[i] for i in idx]  # noqa: E731
        p0 = params[idx[0]]
        cd, dev = _compiled.compute_dtype(p0.dtype), p0.device
        alpha, sigma, eps = (torch.tensor(c, dtype=cd, device=dev) for c in rule.coefficients(counts[idx[0]]))
        args = (pick(params), pick(grads), pick(exp_avgs), pick(exp_avg_sqs), alpha, sigma, eps,
                torch.tensor(decay, dtype=cd, device=dev), k)
        key = (tuple((tuple(params[i].shape), params[i].dtype, grads[i].dtype) for i in idx), str(dev),
               tuple(sorted(k.items())))
        # The eager fallback counts the step itself; the compiled path counts it after the graph ran.
        _compiled.run_or_fallback(
            _compiled.adam_step, key, dev.type, args,
            lambda pick=pick: for_loop(pick(params), pick(grads), pick(exp_avgs), pick(exp_avg_sqs), pick(steps), rule),
        )
    for s, c in zip(steps, counts):
        if s.item() < c:
            s += 1


KERNELS: dict[str, Callable[..., None]] = {
    "for-loop": for_loop, "foreach": foreach, "fused": fused, "compiled": compiled,
}
