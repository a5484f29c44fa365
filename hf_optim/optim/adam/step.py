"""One step of the Adam family (:mod:`hf_optim.optim.adam.optimizers`) over a parameter group: the group's tensors and
state gathered (state created on first use, float32 work copies of bf16/fp16 parameters, complex as real), the kernels'
:class:`~hf_optim.optim.adam.kernels.Rule` built from the group, the chosen kernel run, low-precision results written
back. The kernels themselves are :mod:`hf_optim.optim.adam.kernels`."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ... import precision
from .kernels import KERNELS, Rule


def make_rule(group: dict[str, Any], *, rectify: bool, atan2: bool) -> Rule:
    """The kernels' :class:`~hf_optim.optim.adam.kernels.Rule` for ``group`` (RAdam rectifies, AdamAtan2 uses atan2)."""
    beta1, beta2 = group["betas"]
    return Rule(
        lr=group["lr"],
        beta1=beta1,
        beta2=beta2,
        eps=group.get("eps", 0.0),
        eps_mode=group.get("eps_mode", "torch"),
        weight_decay=group["weight_decay"],
        weight_decay_mode=group["weight_decay_mode"],
        lr_peak=group["lr_peak"],
        maximize=group["maximize"],
        rectify=rectify,
        atan2=(group["a"], group["b"]) if atan2 else None,
    )


def step_group(opt: Any, group: dict[str, Any]) -> None:
    """One step of the Adam-family optimizer ``opt`` (:mod:`hf_optim.optim.adam.optimizers`) over the parameters of
    ``group`` that have gradients: state created on first use, float32 work copies of low-precision parameters, then the
    kernel."""
    params: list[Tensor] = []
    grads: list[Tensor] = []
    exp_avgs: list[Tensor] = []
    exp_avg_sqs: list[Tensor] = []
    steps: list[Tensor] = []
    originals: list[Tensor] = []
    works: list[Tensor] = []
    work_states: list[dict[str, Any]] = []
    mode = precision.param_update_mode(group)
    for p in opt._params_with_grad(group):
        grad = p.grad
        state = opt.state[p]
        if not state:
            # step on the host like torch's non-fused paths
            dtype = precision.state_dtype(p)
            state["step"] = precision.new_step()
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        m, sq = state["exp_avg"], state["exp_avg_sq"]
        if precision.is_low_precision(p):
            originals.append(p)
            work_states.append(state)
            p, grad = precision.work_copy(p, state, mode), precision.work_copy(grad)
            works.append(p)
        if p.is_complex():  # real and imaginary parts are independent coordinates, as in torch.optim.Adam
            p, grad, m, sq = (torch.view_as_real(x) for x in (p, grad, m, sq))
        params.append(p)
        grads.append(grad)
        exp_avgs.append(m)
        exp_avg_sqs.append(sq)
        steps.append(state["step"])
    if not params:
        return
    impl = opt._resolve(group, params)
    if impl == "fused" and params[0].device.type != "cpu":
        steps = _steps_on_device(opt, group, steps)
    KERNELS[impl](params, grads, exp_avgs, exp_avg_sqs, steps, make_rule(group, rectify=opt._rectify, atan2=opt._atan2))
    precision.write_back_(originals, works, mode=mode, states=work_states)


def _steps_on_device(opt: Any, group: dict[str, Any], steps: list[Tensor]) -> list[Tensor]:
    """The CUDA fused kernels read ``step`` on the device: move it there once (kept there afterwards)."""
    moved = []
    with_grad = (p for p in group["params"] if p.grad is not None)
    for p, s in zip(with_grad, steps):
        if s.device != p.device:
            s = opt.state[p]["step"] = s.to(p.device)
        moved.append(s)
    return moved
