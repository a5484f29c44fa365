r"""RMSProp (plain or centered, with optional momentum) with an explicit weight-decay mode (``l2`` by default)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .. import _validation as v
from .._base import ParamOverrides, group_defaults
from .elementwise import ElementwiseOptimizer, State, state_tensor, zeros_like


class RMSProp(ElementwiseOptimizer):
    r"""RMSProp (Tieleman & Hinton 2012), centered variant (Graves 2013), heavy-ball momentum on the scaled step.

    .. math::
       \begin{aligned}
       &\textbf{input}: \alpha_t \text{ (lr, scheduled)}, \alpha \text{ (lr\_peak)}, \rho \text{ (alpha)},
           \epsilon, \mu \text{ (momentum)}, \lambda \text{ (weight decay)}, \text{mode}, \text{centered} \\
       &\textbf{for } t = 1, 2, \dots \\
       &\quad g_t \leftarrow \pm\nabla f_t(x_{t-1}) \quad (- \text{ if maximize}) \\
       &\quad \textbf{if } \text{mode} = \texttt{l2}: \; g_t \leftarrow g_t + \lambda x_{t-1} \\
       &\quad \textbf{else}: \; x_{t-1} \leftarrow x_{t-1}\,(1 - r_t), \quad r_t = \lambda\cdot
           \{\alpha_t,\ \alpha_t/\alpha,\ \alpha_t^2/\alpha\} \text{ for coupled, independent, corrected} \\
       &\quad v_t \leftarrow \rho v_{t-1} + (1 - \rho) g_t^2 \\
       &\quad \textbf{if centered}: \; \bar g_t \leftarrow \rho \bar g_{t-1} + (1 - \rho) g_t, \;
           \tilde v_t \leftarrow v_t - \bar g_t^2 \quad \textbf{else}: \; \tilde v_t \leftarrow v_t \\
       &\quad \textbf{if } \mu > 0: \; b_t \leftarrow \mu b_{t-1} + g_t / (\sqrt{\tilde v_t} + \epsilon), \;
           x_t \leftarrow x_{t-1} - \alpha_t b_t \\
       &\quad \textbf{else}: \; x_t \leftarrow x_{t-1} - \alpha_t\, g_t / (\sqrt{\tilde v_t} + \epsilon)
       \end{aligned}

    State: ``square_avg`` (:math:`v`), ``grad_avg`` (:math:`\bar g`, when centered), ``momentum_buffer``
    (:math:`b`, when μ > 0; all start at 0) and ``step``. With ``weight_decay_mode="l2"`` (the default, because that
    is what ``torch.optim.RMSprop(weight_decay=λ)`` means) this class equals ``torch.optim.RMSprop``. The decoupled
    modes use the group's scheduled lr α_t.

    Args:
        params: parameters or parameter groups.
        lr: learning rate α (peak; a scheduler scales it to α_t).
        alpha: ρ in [0, 1), the smoothing constant of the averages.
        eps: ε >= 0, added to :math:`\sqrt{\tilde v_t}`.
        momentum: μ >= 0; 0 disables the buffer.
        centered: subtract the squared running mean of the gradient (an estimate of its variance).
        weight_decay: λ >= 0.
        weight_decay_mode: ``"l2"`` (default), ``"coupled"``, ``"independent"`` or ``"corrected"``; see
            :mod:`hf_optim.decay`.
        maximize: ascend instead of descend.
        implementation: ``"auto"``, ``"for-loop"`` or ``"foreach"`` (all give the same result).
        state_dtype, state_block_size, state_min_numel, param_update: the memory knobs of every optimizer (state in
            bf16 / int8 / int4 between steps; bf16 weights written back stochastically or with a Kahan buffer):
            :mod:`hf_optim.precision`, docs/memory.md.
        param_overrides: per-parameter ``lr_mult`` / ``weight_decay_mult`` / replacements (see :mod:`hf_optim._base`).

    References:
        Tieleman & Hinton (2012), *Lecture 6.5 — RMSProp*, COURSERA: Neural Networks for Machine Learning.
        Graves (2013), *Generating Sequences With Recurrent Neural Networks*, arXiv:1308.0850 (centered form).
        Loshchilov & Hutter (2019), *Decoupled Weight Decay Regularization* (ICLR).
    """

    state_keys = ("square_avg", "grad_avg", "momentum_buffer")
    nonnegative_state = ("square_avg",)
    interop_formats = ("torch.optim.RMSprop",)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-2,
        *,
        alpha: float = 0.99,
        eps: float = 1e-8,
        momentum: float = 0.0,
        centered: bool = False,
        weight_decay: float = 0.0,
        weight_decay_mode: str = "l2",
        maximize: bool = False,
        implementation: str = "auto",
        state_dtype: str = "float32",
        state_block_size: int = 256,
        state_min_numel: int = 4096,
        param_update: str = "nearest",
        param_overrides: ParamOverrides | None = None,
    ) -> None:
        super().__init__(params, group_defaults(RMSProp.__init__, locals()), param_overrides=param_overrides)

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        v.check_unit_interval("alpha", group["alpha"])
        v.check_non_negative("eps", group["eps"])
        v.check_non_negative("momentum", group["momentum"])
        v.check_bool("centered", group["centered"])
        alpha, eps = group["alpha"], group["eps"]
        # E[g^2] - E[g]^2 = alpha*(1-alpha)*g^2 after one step: exactly 0 in float32 once 1 - alpha rounds to 1
        degenerate = alpha == 0 or (eps == 0 and min(alpha, 1 - alpha) < torch.finfo(torch.float32).eps)
        if group["centered"] and degenerate:
            raise ValueError(
                f"alpha={alpha:g} with centered=True: the centered second moment E[g^2] - E[g]^2 is alpha*(1-alpha)*g^2 "
                "after the first step, 0 in float32 for alpha = 0 (or, with eps=0, this close to it), so the update "
                "divides by eps alone (NaN for eps=0). Use alpha > 0 (e.g. 0.99), eps > 0 or centered=False."
            )

        if group["centered"] and group.get("state_dtype", "float32") != "float32":
            raise ValueError(
                f"state_dtype={group['state_dtype']!r} with centered=True: the centred variance square_avg - grad_avg^2 "
                "is a difference of two nearly equal statistics, and storing them separately in fewer bits breaks "
                "square_avg >= grad_avg^2 (a negative variance, NaN after the square root). Use state_dtype='float32' "
                "with centered=True, or centered=False."
            )

    def _init_state(self, group: dict[str, Any], state: State, param: torch.Tensor) -> None:
        state["square_avg"] = zeros_like(param)
        if group["centered"]:
            state["grad_avg"] = zeros_like(param)
        if group["momentum"] > 0:
            state["momentum_buffer"] = zeros_like(param)

    def _update(
        self,
        group: dict[str, Any],
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        states: list[State],
        lrs: list[float],
    ) -> None:
        rho, lr = group["alpha"], group["lr"]
        # state_tensor also creates a buffer switched on later (e.g. momentum set on the group mid-run), at zero.
        square_avgs = [state_tensor(s, "square_avg", p, zeros_like) for s, p in zip(states, params)]
        torch._foreach_mul_(square_avgs, rho)
        torch._foreach_addcmul_(square_avgs, grads, grads, value=1.0 - rho)
        if group["centered"]:
            grad_avgs = [state_tensor(s, "grad_avg", p, zeros_like) for s, p in zip(states, params)]
            torch._foreach_lerp_(grad_avgs, grads, 1.0 - rho)
            denom = torch._foreach_addcmul(square_avgs, grad_avgs, grad_avgs, value=-1.0)
            torch._foreach_sqrt_(denom)
        else:
            denom = torch._foreach_sqrt(square_avgs)
        torch._foreach_add_(denom, group["eps"])
        if group["momentum"] > 0:
            bufs = [state_tensor(s, "momentum_buffer", p, zeros_like) for s, p in zip(states, params)]
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_addcdiv_(bufs, grads, denom)
            torch._foreach_add_(params, bufs, alpha=-lr)
        else:
            torch._foreach_addcdiv_(params, grads, denom, value=-lr)
