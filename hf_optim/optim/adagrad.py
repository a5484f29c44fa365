r"""AdaGrad with an explicit weight-decay mode (``l2`` by default, which is ``torch.optim.Adagrad``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .. import _validation as v
from .._base import ParamOverrides, group_defaults
from .elementwise import ElementwiseOptimizer, State, state_tensor


class AdaGrad(ElementwiseOptimizer):
    r"""AdaGrad (Duchi, Hazan & Singer 2011), diagonal form, with ``torch.optim.Adagrad``'s ``lr_decay``.

    .. math::
       \begin{aligned}
       &\textbf{input}: \alpha_t \text{ (lr, scheduled)}, \alpha \text{ (lr\_peak)}, \delta \text{ (lr\_decay)},
           s_0 \text{ (initial\_accumulator\_value)}, \epsilon, \lambda \text{ (weight decay)}, \text{mode} \\
       &\textbf{for } t = 1, 2, \dots \\
       &\quad g_t \leftarrow \pm\nabla f_t(x_{t-1}) \quad (- \text{ if maximize}) \\
       &\quad \eta_t \leftarrow \alpha_t / (1 + (t - 1)\,\delta) \\
       &\quad \textbf{if } \text{mode} = \texttt{l2}: \; g_t \leftarrow g_t + \lambda x_{t-1} \\
       &\quad \textbf{else}: \; x_{t-1} \leftarrow x_{t-1}\,(1 - r_t), \quad r_t = \lambda\cdot
           \{\eta_t,\ \eta_t/\alpha,\ \eta_t^2/\alpha\} \text{ for coupled, independent, corrected} \\
       &\quad S_t \leftarrow S_{t-1} + g_t^2 \\
       &\quad x_t \leftarrow x_{t-1} - \eta_t\, g_t / (\sqrt{S_t} + \epsilon)
       \end{aligned}

    State: ``sum`` (:math:`S`, starts at ``initial_accumulator_value``) and ``step`` (float32 0-d tensor, counted per
    parameter as torch does). With ``weight_decay_mode="l2"`` (the default, because that is what
    ``torch.optim.Adagrad(weight_decay=λ)`` means) this class equals ``torch.optim.Adagrad``.

    **Which learning rate the decoupled modes use**: the *decayed* step size :math:`\eta_t`. ``lr_decay`` is treated as
    a built-in ``1/(1+(t-1)δ)`` learning-rate schedule, so ``AdaGrad(lr_decay=δ)`` is exactly ``AdaGrad(lr_decay=0)``
    under a scheduler that multiplies the lr by that factor, in every weight-decay mode; ``lr_peak`` stays the group's
    peak lr.

    Args:
        params: parameters or parameter groups.
        lr: learning rate α (peak; a scheduler scales it to α_t).
        lr_decay: δ >= 0.
        initial_accumulator_value: s_0 >= 0, the starting value of every entry of ``sum``.
        eps: ε >= 0, added to :math:`\sqrt{S_t}`.
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
        Duchi, Hazan & Singer (2011), *Adaptive Subgradient Methods for Online Learning and Stochastic Optimization*
        (JMLR 12). Loshchilov & Hutter (2019), *Decoupled Weight Decay Regularization* (ICLR).
    """

    state_keys = ("sum",)
    nonnegative_state = ("sum",)
    interop_formats = ("torch.optim.Adagrad",)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-2,
        *,
        lr_decay: float = 0.0,
        initial_accumulator_value: float = 0.0,
        eps: float = 1e-10,
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
        super().__init__(params, group_defaults(AdaGrad.__init__, locals()), param_overrides=param_overrides)

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        v.check_non_negative("lr_decay", group["lr_decay"])
        v.check_non_negative("initial_accumulator_value", group["initial_accumulator_value"])
        v.check_non_negative("eps", group["eps"])

    def _init_state(self, group: dict[str, Any], state: State, param: torch.Tensor) -> None:
        state["sum"] = torch.full_like(param, group["initial_accumulator_value"], memory_format=torch.preserve_format)

    def _step_sizes(self, group: dict[str, Any], steps: list[float]) -> list[float]:
        return [group["lr"] / (1 + (step - 1) * group["lr_decay"]) for step in steps]

    def _update(
        self,
        group: dict[str, Any],
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        states: list[State],
        lrs: list[float],
    ) -> None:
        sums = [state_tensor(s, "sum", p, torch.zeros_like) for s, p in zip(states, params)]
        torch._foreach_addcmul_(sums, grads, grads, value=1.0)
        std = torch._foreach_sqrt(sums)
        torch._foreach_add_(std, group["eps"])
        torch._foreach_addcdiv_(params, grads, std, [-lr for lr in lrs])
