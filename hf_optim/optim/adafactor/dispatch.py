"""Adafactor's dispatch: which implementation (the C kernel, the compiled graph, eager foreach or for-loop) steps
which tensors of a parameter group. The rule itself is :mod:`hf_optim.optim.adafactor.rule`; the optimizer class,
:mod:`hf_optim.optim.adafactor.optimizer`, calls :func:`step_group` once per group."""

from __future__ import annotations

import math
from typing import Any

import torch

from ... import _compiled, precision
from ..._distributed import local, shard_spec
from . import native as _native
from .rule import Item, eager_step, factor_dims, step_scalars


def resolve(impl: str, params: list[torch.Tensor]) -> str:
    """``auto``: compiled for groups of at least ``AUTO_MIN_NUMEL`` elements where compilation works (its cost, seconds
    per shape, is earned back only by large models); otherwise foreach off the CPU and the for-loop on the CPU (which
    reuses one scratch buffer: fresh large CPU allocations page-fault)."""
    if impl != "auto":
        return impl
    device = local(params[0]).device.type
    if sum(p.numel() for p in params) >= _compiled.AUTO_MIN_NUMEL and not _compiled.compile_broken(device):
        return "compiled"
    return "foreach" if all(local(p).device.type != "cpu" for p in params) else "for-loop"


def step_group(opt: Any, params: list[torch.Tensor], group: dict[str, Any], impl: str) -> None:
    """One step of the :class:`~hf_optim.optim.adafactor.optimizer.Adafactor` ``opt`` for the parameters of ``group``
    that have gradients."""
    items = []
    for p in params:
        x, g = local(p), local(p.grad)
        state = opt._init_state(p, g, group)
        state["step"] += 1
        # `step` lives on the CPU: no device sync
        items.append(Item(x, g, state, factor_dims(p.shape, group), step_scalars(state["step"].item(), group), p))
    took_native = False
    if impl in ("auto", "fused") and _native.supports_group(group) and _native.library() is not None:
        # The C kernel takes every factored fp32 CPU matrix (on the CPU it beats the other paths at every size).
        native = [it for it in items if shard_spec(it.param) is None and _native.supports_tensor(it.x, it.g, it.dims)]
        if native:
            _native_steps(native, group)
        native_ids = {id(it) for it in native}
        items = [it for it in items if id(it) not in native_ids]
        took_native = bool(native)
    if not items:
        return
    if impl == "fused" or took_native:
        # What the kernel leaves is usually a handful of norm vectors: one multi-tensor pass beats a Python loop
        # (17 norm vectors of the 58M set: ~3 ms for-loop, ~0.5 ms foreach).
        impl = "foreach" if sum(it.x.numel() for it in items) < _compiled.AUTO_MIN_NUMEL else "auto"
    impl = resolve(impl, [it.param for it in items])
    if impl == "compiled":
        # FSDP2 shards need cross-rank reductions, empty tensors have nothing to fuse, stochastic rounding draws
        # eager random bits, and Inductor mishandles 0-d float64 (_compiled.inductor_ok): those stay eager.
        fast = [
            it
            for it in items
            if shard_spec(it.param) is None
            and it.x.numel() > 0
            and _compiled.inductor_ok(it.x)
            and not (precision.is_low_precision(it.x) and precision.param_update_mode(group) != "nearest")
        ]
        if fast:
            _compiled.adafactor_group(fast, group, lambda sub: eager_step(sub, group, False, opt._scratch_for))
            fast_ids = {id(it) for it in fast}
            items = [it for it in items if id(it) not in fast_ids]
    if items:
        eager_step(items, group, impl == "foreach", opt._scratch_for)


def _native_steps(items: list[Item], group: dict[str, Any]) -> None:
    """Step sizes and decay as :func:`hf_optim.optim.adafactor.rule.apply_update` computes them, then the C kernel."""
    jobs = []
    for it in items:
        sc = it.scalars
        alpha = sc.rho
        if group["scale_parameter"]:  # max(eps2, RMS(x_{t-1})) · ρ_t
            alpha = max(group["eps2"], torch.linalg.vector_norm(it.x).item() / math.sqrt(it.x.numel())) * sc.rho
        jobs.append(_native.Job(it.x, it.g, it.state, sc.beta2, alpha, float(sc.decay_rate(alpha))))
    _native.adafactor_steps(
        jobs,
        eps1=group["eps1"],
        clip=group["clip_threshold"],
        decay_as_factor=group["decay_as_factor"],
        maximize=group["maximize"],
        beta1=group["beta1"],
        momentum_before_lr=group["momentum_before_lr"],
    )
