r"""A toy optimizer added the documented way: this module (the class) + one spec (below) + one row of
``tests/optimizer_cases.py``. Nothing else in the package or the tests names it, yet it gets the Trainer name, the
checked state loader, the benchmark and every generic invariant (``tests/test_toy_optimizer.py`` checks that).

Signum (Bernstein et al. 2018, "signSGD: Compressed Optimisation for Non-Convex Problems"): the sign of an
exponential moving average of the gradient,

.. math::
    m_t \leftarrow \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad x_t \leftarrow x_{t-1} - \alpha_t \operatorname{sign}(m_t)

with the weight-decay modes of :mod:`hf_optim.decay` applied by the shared element-wise step.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from hf_optim import OptimizerSpec, register_optimizer
from hf_optim import _validation as v
from hf_optim._base import ParamOverrides, group_defaults
from hf_optim.optim.elementwise import ElementwiseOptimizer, State, state_tensor, zeros_like


class Signum(ElementwiseOptimizer):
    """Signum: ``x -= lr * sign(EMA_beta(g))``; ``beta1=0`` is signSGD."""

    counts_steps = False
    state_keys = ("exp_avg",)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-4,
        *,
        beta1: float = 0.9,
        weight_decay: float = 0.0,
        weight_decay_mode: str = "coupled",
        maximize: bool = False,
        implementation: str = "auto",
        param_overrides: ParamOverrides | None = None,
    ) -> None:
        super().__init__(params, group_defaults(Signum.__init__, locals()), param_overrides=param_overrides)

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        v.check_number("beta1", group["beta1"])
        if not 0.0 <= group["beta1"] < 1.0:
            raise ValueError(f"beta1 must be in [0, 1), got {group['beta1']!r}.")

    def _init_state(self, group: dict[str, Any], state: State, param: torch.Tensor) -> None:
        state["exp_avg"] = zeros_like(param)

    def _update(
        self,
        group: dict[str, Any],
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        states: list[State],
        lrs: list[float],
    ) -> None:
        avgs = [state_tensor(s, "exp_avg", p, zeros_like) for s, p in zip(states, params)]
        torch._foreach_lerp_(avgs, grads, 1.0 - group["beta1"])
        torch._foreach_add_(params, torch._foreach_sign(avgs), alpha=-group["lr"])


SPEC = register_optimizer(
    OptimizerSpec(
        "toy_signum", "toy_optimizer:Signum", "Signum (test toy: one module + one spec + one row).", adam_args=False
    )
)
