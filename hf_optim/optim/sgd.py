r"""SGDW: stochastic gradient descent with momentum or Nesterov momentum and an explicit weight-decay mode."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .. import _validation as v
from .._base import ParamOverrides, group_defaults
from .elementwise import ElementwiseOptimizer, State, state_tensor, zeros_like


class SGDW(ElementwiseOptimizer):
    r"""SGD with (Nesterov) momentum and a weight-decay mode (Loshchilov & Hutter 2019's SGDW by default).

    .. math::
       \begin{aligned}
       &\textbf{input}: \alpha_t \text{ (lr, scheduled)}, \alpha \text{ (lr\_peak)}, \mu \text{ (momentum)},
           \tau \text{ (dampening)}, \lambda \text{ (weight decay)}, \text{mode}, \text{nesterov}, \text{maximize} \\
       &\textbf{for } t = 1, 2, \dots \\
       &\quad g_t \leftarrow \pm\nabla f_t(x_{t-1}) \quad (- \text{ if maximize}) \\
       &\quad \textbf{if } \text{mode} = \texttt{l2}: \; g_t \leftarrow g_t + \lambda x_{t-1} \\
       &\quad \textbf{else}: \; x_{t-1} \leftarrow x_{t-1}\,(1 - r_t), \quad r_t = \lambda\cdot
           \{\alpha_t,\ \alpha_t/\alpha,\ \alpha_t^2/\alpha\} \text{ for coupled, independent, corrected} \\
       &\quad \textbf{if } \mu \neq 0: \\
       &\quad\quad b_t \leftarrow g_t \text{ if } t = 1 \text{ else } \mu b_{t-1} + (1-\tau) g_t \\
       &\quad\quad d_t \leftarrow g_t + \mu b_t \text{ if nesterov else } b_t \\
       &\quad \textbf{else}: \; d_t \leftarrow g_t \\
       &\quad x_t \leftarrow x_{t-1} - \alpha_t d_t
       \end{aligned}

    The momentum buffer ``b`` (state key ``momentum_buffer``) follows ``torch.optim.SGD`` exactly, including the
    undampened first step; with ``weight_decay_mode="l2"`` this class *is* ``torch.optim.SGD(weight_decay=λ)``.

    **Default decay mode: ``"coupled"``** (``x ← x(1 - α_t λ)``, torch-AdamW style). Decay is decoupled from the
    gradient as in SGDW (Loshchilov & Hutter 2019), so it does not pass through the momentum buffer, and λ keeps the
    meaning users quote for AdamW-style recipes. Without momentum, ``coupled`` and ``l2`` give the same update. The
    paper's exact form, where decay follows only the schedule multiplier ``α_t/α``, is ``"independent"``
    (λ of order 1e-5…1e-4).

    Args:
        params: parameters or parameter groups.
        lr: learning rate α (peak; a scheduler scales it to α_t).
        momentum: μ >= 0; 0 disables the buffer.
        dampening: τ in [0, 1]; scales the gradient entering the buffer by ``1 - τ`` (not on the first step).
        nesterov: Nesterov momentum in the formulation of Sutskever et al. 2013 (as torch); needs μ > 0 and τ = 0.
        weight_decay: λ >= 0.
        weight_decay_mode: ``"l2"``, ``"coupled"`` (default), ``"independent"`` or ``"corrected"``; see
            :mod:`hf_optim.decay`.
        maximize: ascend instead of descend.
        implementation: ``"auto"``, ``"for-loop"`` or ``"foreach"`` (all give the same result).
        state_dtype, state_block_size, state_min_numel, param_update: the memory knobs of every optimizer (state in
            bf16 / int8 / int4 between steps; bf16 weights written back stochastically or with a Kahan buffer):
            :mod:`hf_optim.precision`, docs/memory.md.
        param_overrides: per-parameter ``lr_mult`` / ``weight_decay_mult`` / replacements (see :mod:`hf_optim._base`).

    References:
        Sutskever, Martens, Dahl & Hinton (2013), *On the importance of initialization and momentum in deep learning*.
        Loshchilov & Hutter (2019), *Decoupled Weight Decay Regularization* (ICLR).
    """

    counts_steps = False

    state_keys = ("momentum_buffer",)
    interop_formats = ("torch.optim.SGD",)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        *,
        momentum: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        weight_decay_mode: str = "coupled",
        maximize: bool = False,
        implementation: str = "auto",
        state_dtype: str = "float32",
        state_block_size: int = 256,
        state_min_numel: int = 4096,
        param_update: str = "nearest",
        param_overrides: ParamOverrides | None = None,
    ) -> None:
        super().__init__(params, group_defaults(SGDW.__init__, locals()), param_overrides=param_overrides)

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        v.check_non_negative("momentum", group["momentum"])
        v.check_number("dampening", group["dampening"])
        if not 0.0 <= group["dampening"] <= 1.0:
            raise ValueError(f"dampening must be in [0, 1], got {group['dampening']!r}.")
        v.check_bool("nesterov", group["nesterov"])
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(
                f"nesterov=True requires momentum > 0 and dampening = 0, got momentum={group['momentum']!r}, "
                f"dampening={group['dampening']!r}."
            )

    def _init_state(self, group: dict[str, Any], state: State, param: torch.Tensor) -> None:
        pass  # the momentum buffer is the first gradient itself (torch semantics), created in _update

    def _update(
        self,
        group: dict[str, Any],
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        states: list[State],
        lrs: list[float],
    ) -> None:
        momentum = group["momentum"]
        direction = grads
        if momentum != 0:
            old = [i for i, s in enumerate(states) if s.get("momentum_buffer") is not None]
            if old:
                bufs = [state_tensor(states[i], "momentum_buffer", params[i], zeros_like) for i in old]
                torch._foreach_mul_(bufs, momentum)
                torch._foreach_add_(bufs, [grads[i] for i in old], alpha=1.0 - group["dampening"])
            for s, g in zip(states, grads):
                if s.get("momentum_buffer") is None:
                    s["momentum_buffer"] = torch.clone(g).detach()
            bufs = [s["momentum_buffer"] for s in states]
            direction = torch._foreach_add(grads, bufs, alpha=momentum) if group["nesterov"] else bufs
        torch._foreach_add_(params, direction, alpha=-group["lr"])
