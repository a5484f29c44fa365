r"""Adafactor's update rule (the algorithm box of :class:`hf_optim.optim.adafactor.optimizer.Adafactor`), as functions
over lists of local tensors: the eager ``for-loop`` and ``foreach`` paths. One function per stage, each implemented
once:

* :func:`step_scalars`: the per-step scalars :math:`\beta_{2,t}`, :math:`\rho_t` and the decay rate's coefficient
  (:class:`StepScalars`), computed once per step and used by every implementation (eager, compiled, C);
* :func:`preconditioned_gradient`: update the second-moment statistics, return :math:`U = g/\sqrt{V}`;
* :func:`deltas_with_momentum`: clipping, the learning rate and β1 momentum (before or after the lr);
* :func:`subtract_decay_`: the decoupled weight decay :math:`x \leftarrow x - r x`;
* :func:`hf_optim.precision.write_back_`: low-precision parameters receive the fp32 result (round-to-nearest, or
  stochastic);
* :func:`eager_step` ties them together;
* :func:`factor_dims`: the two dims of a tensor whose statistics are factored (``None``: unfactored).

The C kernel (:mod:`hf_optim.optim.adafactor.native`) and the compiled graph (:mod:`hf_optim._compiled`) are other
implementations of the same rule, tested against these functions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from ... import precision
from ..._distributed import ShardSpec, all_reduce_sum_, mean_over, shard_spec
from ...decay import coupled_equivalent, decay_rate, l2_coefficient

ScratchFor = Callable[[torch.Tensor], "torch.Tensor | None"]


class StepScalars(NamedTuple):
    r"""The per-step scalars of one group at step ``t``, computed once (:func:`step_scalars`) for every path.

    The decay rate is :math:`r_t = c\,\alpha_t^{k}` (:meth:`decay_rate`) with :math:`\alpha_t` the step size
    after parameter scaling: ``k = 0`` when the decay does not depend on :math:`\alpha_t` (``weight_decay_lr=
    "group"``, or no parameter scaling, where :math:`\alpha_t = \rho_t` is known here), else ``k = 1`` (coupled,
    independent) or ``2`` (corrected), because :math:`\alpha_t = \rho_t \max(\epsilon_2, \mathrm{RMS}(x))` is known
    only per tensor (in the compiled graph: only inside it).
    """

    beta2: float  # β2_t = min(β̂, 1 - t^-c)
    rho: float  # ρ_t: the step size before parameter scaling
    decay_coef: float  # c in r_t = c·α_t^k (0: no decoupled decay)
    decay_power: int  # k

    def decay_rate(self, alpha: Any) -> Any:
        """:math:`r_t` for the step size ``alpha`` (a float, or a 0-d tensor under parameter scaling)."""
        return self.decay_coef if self.decay_power == 0 else self.decay_coef * alpha**self.decay_power


class Item(NamedTuple):
    """One tensor's work in a step (its ``step`` already counted)."""

    x: torch.Tensor  # the local parameter tensor (the shard under FSDP2)
    g: torch.Tensor  # its local gradient
    state: dict[str, Any]
    dims: tuple[int, int] | None  # factored dims, or None
    scalars: StepScalars
    param: Any = None  # the parameter itself (a DTensor under FSDP2), for shard specs


def relative_step(t: float, group: dict[str, Any]) -> float:
    """ρ_t for 1-based step ``t``: the step size before parameter scaling."""
    lr = group["lr"]
    if not group["relative_step"]:
        return lr
    if group["relative_step_lr"] == "cap":  # torch.optim.Adafactor: the lr caps 1/sqrt(t)
        return min(lr, 1.0 / math.sqrt(t))
    ceiling = 1e-6 * t if group["warmup_init"] else group["rho_max"]
    return lr * min(ceiling, 1.0 / math.sqrt(t))


def _decay(group: dict[str, Any], rho: float) -> tuple[float, int]:
    """``(c, k)`` of the decay rate ``r_t = c·α_t^k`` (see :class:`StepScalars`); the decay formula itself is
    :func:`hf_optim.decay.decay_rate` / :func:`hf_optim.decay.coupled_equivalent`, written once there."""
    mode, wd, lr_peak = group["weight_decay_mode"], group["weight_decay"], group["lr_peak"]
    if not wd or mode == "l2":
        return 0.0, 0
    if group["weight_decay_lr"] == "group":
        return decay_rate(mode, wd, group["lr"], lr_peak), 0
    if not group["scale_parameter"]:  # α_t = ρ_t
        return decay_rate(mode, wd, rho, lr_peak), 0
    # r = α·coupled_equivalent(α): λ·α (coupled), (λ/α_peak)·α (independent), (λ/α_peak)·α² (corrected)
    return coupled_equivalent(mode, wd, 1.0, lr_peak), (2 if mode == "corrected" else 1)


def step_scalars(t: float, group: dict[str, Any]) -> StepScalars:
    """The scalars of 1-based step ``t`` for ``group`` (see :class:`StepScalars`)."""
    beta2 = 1.0 - math.pow(t, -group["decay_rate"])
    if group["beta2_cap"] is not None:
        beta2 = min(group["beta2_cap"], beta2)
    rho = relative_step(t, group)
    return StepScalars(beta2, rho, *_decay(group, rho))


def _sum_of_squares(x: torch.Tensor, spec: ShardSpec | None) -> torch.Tensor:
    total = torch.linalg.vector_norm(x).square()
    if spec is not None:  # one scalar per shard group: O(1) communication
        all_reduce_sum_(total, [group for _, group in spec.sharded])
    return total


def rms(x: torch.Tensor, spec: ShardSpec | None) -> torch.Tensor:
    """RMS of the whole tensor (all shards) as a 0-d tensor: no host sync."""
    numel = x.numel() if spec is None else spec.global_shape.numel()
    if spec is None:  # norm / sqrt(n), the form transformers and torch use
        return torch.linalg.vector_norm(x) / math.sqrt(numel)
    return _sum_of_squares(x, spec).sqrt() / math.sqrt(numel)


def preconditioned_gradient(
    g: torch.Tensor,
    state: dict[str, Any],
    dims: tuple[int, int] | None,
    beta2: float,
    eps1: float,
    eps1_mode: str,
    spec: ShardSpec | None,
    scratch: torch.Tensor | None = None,
) -> torch.Tensor:
    """Update the second-moment statistics and return the preconditioned gradient ``U = g / sqrt(V)``.

    ``U`` is written into ``scratch`` (a reused buffer) when given, else into a new tensor. Under FSDP2 only the
    means over a sharded dim travel between ranks (a row or column vector, or one scalar).
    """
    sq = torch.mul(g, g, out=scratch) if scratch is not None else g * g
    add = eps1_mode == "add"
    if dims is None:
        v_ = state["exp_avg_sq"]
        if add:
            sq.add_(eps1)
        v_.lerp_(sq, 1.0 - beta2)
        denom = sq.copy_(v_) if add else torch.clamp(v_, min=eps1 * eps1)
        return denom.rsqrt_().mul_(g)
    row, col = dims
    r_new = mean_over(sq, col, spec).squeeze(col)
    c_new = mean_over(sq, row, spec).squeeze(row)
    if add:
        r_new.add_(eps1)
        c_new.add_(eps1)
    rows, cols = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
    rows.lerp_(r_new, 1.0 - beta2)
    cols.lerp_(c_new, 1.0 - beta2)
    rows_k, cols_k = rows.unsqueeze(col), cols.unsqueeze(row)
    row_mean = mean_over(rows_k, row, spec)  # = mean of all of V, the normaliser of R C
    if add:  # g * rsqrt(R/mean R) * rsqrt(C): never materialises V
        return torch.mul(g, (rows_k / row_mean).rsqrt_(), out=sq).mul_(cols_k.rsqrt())
    var = torch.mul(rows_k / row_mean.clamp(min=eps1), cols_k, out=sq)  # sq is no longer needed
    return var.clamp_(min=eps1 * eps1).rsqrt_().mul_(g)


def eager_step(items: Sequence[Item], group: dict[str, Any], foreach: bool, scratch_for: ScratchFor) -> None:
    """The eager paths over ``items`` (see :data:`Item`) whose ``step`` is already counted.

    for-loop: one tensor at a time through every stage (peak extra memory: one scratch tensor, reused across steps
    on CPU where fresh large allocations page-fault); foreach: the whole group at once.
    """
    xs, x32s, gs, specs, states, dims_list, scalars = [], [], [], [], [], [], []
    l2 = l2_coefficient(group["weight_decay_mode"], group["weight_decay"])
    for x, g, state, dims, scalar, param in items:
        xs.append(x)
        x32s.append(precision.work_copy(x, state, precision.param_update_mode(group)))
        g32 = precision.work_copy(g)
        if group["maximize"]:
            g32 = -g32
        if l2:
            g32 = g32.add(x32s[-1], alpha=l2)
        gs.append(g32)
        specs.append(shard_spec(param) if param is not None else None)
        states.append(state)
        dims_list.append(dims)
        scalars.append(scalar)

    chunks = [list(range(len(xs)))] if foreach else [[i] for i in range(len(xs))]
    for idx in chunks:
        pick = lambda seq, idx=idx: [seq[i] for i in idx]
        scratch = None if foreach else scratch_for(gs[idx[0]])
        apply_update(
            pick(xs),
            pick(x32s),
            pick(gs),
            pick(specs),
            pick(states),
            pick(dims_list),
            pick(scalars),
            group,
            foreach,
            scratch,
        )


def apply_update(
    xs: list[torch.Tensor],
    x32s: list[torch.Tensor],
    gs: list[torch.Tensor],
    specs: list[ShardSpec | None],
    states: list[dict[str, Any]],
    dims_list: list[Any],
    scalars: list[StepScalars],
    group: dict[str, Any],
    foreach: bool,
    scratch: torch.Tensor | None,
) -> None:
    """Steps 2-6 of the algorithm for a list of tensors: step size, direction, clipping, momentum, decay, write."""
    # Step size α_t: measured on x_{t-1}, before any decay (as transformers and torch).
    alphas: list[Any] = [s.rho for s in scalars]
    if group["scale_parameter"]:
        alphas = [
            python_max(rms(x, s), group["max_ignores_nan"], group["eps2"]) * rho
            for x, s, rho in zip(x32s, specs, alphas)
        ]

    # Preconditioned direction (per tensor: its statistics are reductions over its own dims).
    updates = []
    for x, g, state, dims, spec, sc in zip(xs, gs, states, dims_list, specs, scalars):
        eps1 = group["eps1"] if group["eps1"] is not None else torch.finfo(x.dtype).eps  # torch: param dtype
        updates.append(preconditioned_gradient(g, state, dims, sc.beta2, eps1, group["eps1_mode"], spec, scratch))

    clips = None  # 1 / max(1, RMS(U)/d), applied together with the learning rate (one pass over U)
    if group["clip_threshold"] is not None:
        d = group["clip_threshold"]
        if foreach and not any(specs):
            numels = [math.sqrt(u.numel()) * d for u in updates]
            ratios = [n.div_(c) for n, c in zip(torch._foreach_norm(updates), numels)]
        else:
            ratios = [rms(u, s) / d for u, s in zip(updates, specs)]
        clips = [python_max(r, group["max_ignores_nan"]).reciprocal_() for r in ratios]

    deltas = deltas_with_momentum(updates, alphas, clips, states, group, foreach)

    # Weight decay x *= 1 - r_t, then x -= Δ.
    if any(sc.decay_coef for sc in scalars):
        rates = [sc.decay_rate(a) for sc, a in zip(scalars, alphas)]
        if group["decay_as_factor"]:  # torch.optim.Adafactor: x *= 1 - r, the factor rounded to fp32
            foreach_or_loop(foreach, "mul_", x32s, [1.0 - r for r in rates])
        else:
            subtract_decay_(x32s, rates, foreach)
    foreach_or_loop(foreach, "sub_", x32s, deltas)
    precision.write_back_(xs, x32s, mode=precision.param_update_mode(group), states=states)


def python_max(x: torch.Tensor, ignores_nan: bool, floor: float = 1.0) -> torch.Tensor:
    """``max(floor, x)`` for the clip divisor ``max(1, RMS(U)/d)`` and the parameter scale ``max(eps2, RMS(x))``.

    ``ignores_nan``: as Python's ``max(floor, x)`` in ``torch.optim.Adafactor``, a NaN ``x`` gives ``floor`` (no
    clipping, scale eps2), so a NaN gradient entry poisons only what it reaches, not the whole tensor; otherwise
    (transformers, optax) NaN propagates. ``+inf`` stays ``+inf`` in both."""
    if ignores_nan:
        return torch.where(x > floor, x, torch.full_like(x, floor))
    return x.clamp_(min=floor)


def deltas_with_momentum(
    updates: list[torch.Tensor],
    alphas: list[Any],
    clips: list[torch.Tensor] | None,
    states: list[dict[str, Any]],
    group: dict[str, Any],
    foreach: bool,
) -> list[torch.Tensor]:
    """The tensors Δ to subtract: clip and lr scaling, with β1 momentum before or after the lr scaling.

    ``updates`` are scratch tensors owned by the step and are reused in place.
    """
    beta1, before = group["beta1"], group["momentum_before_lr"]
    if beta1 is None or not before:
        foreach_or_loop(foreach, "mul_", updates, alphas if clips is None else [c * a for c, a in zip(clips, alphas)])
        if beta1 is None:
            return updates
    elif clips is not None:
        foreach_or_loop(foreach, "mul_", updates, clips)
    stored = [s["exp_avg"] for s in states]
    if all(m.dtype == u.dtype for m, u in zip(stored, updates)):
        if foreach:
            torch._foreach_lerp_(stored, updates, 1.0 - beta1)
        else:
            for m, u in zip(stored, updates):
                m.lerp_(u, 1.0 - beta1)
        moms = stored
    else:  # low-precision storage: average into the fp32 scratch, store it rounded, step with the fp32 value
        moms = []
        for m, u in zip(stored, updates):
            if m.dtype == u.dtype:
                moms.append(m.lerp_(u, 1.0 - beta1))
            else:
                moms.append(ema_into_low_precision_(u, m, beta1))
    if not before:
        return moms
    if any(m is s for m, s in zip(moms, stored)):  # never scale the state itself
        return [m * a for m, a in zip(moms, alphas)]
    foreach_or_loop(foreach, "mul_", moms, alphas)
    return moms


def ema_into_low_precision_(u: torch.Tensor, m: torch.Tensor, beta1: float, block: int = 1 << 16) -> torch.Tensor:
    """``u <- β1·m + (1-β1)·u`` in u's precision, then ``m <- u`` rounded to m's dtype; returns ``u``.

    On CPU, kernels mixing bf16 and fp32 operands are ~8x slower than a conversion copy, so m is widened in
    cache-sized blocks; elsewhere one mixed-dtype expression is fine.
    """
    if u.device.type != "cpu" or not (u.is_contiguous() and m.is_contiguous()):
        u.mul_(1.0 - beta1).add_(m, alpha=beta1)
        m.copy_(u)
        return u
    flat_u, flat_m = u.view(-1), m.view(-1)
    buf = torch.empty(min(block, flat_u.numel()), dtype=u.dtype)
    for start in range(0, flat_u.numel(), block):
        end = min(start + block, flat_u.numel())
        wide, part = buf[: end - start].copy_(flat_m[start:end]), flat_u[start:end]
        torch.lerp(wide, part, 1.0 - beta1, out=part)
        flat_m[start:end].copy_(part)
    return u


def subtract_decay_(xs: list[torch.Tensor], rates: list[Any], foreach: bool) -> None:
    """``x -= r·x``; written as a subtraction because ``x * (1 - r)`` rounds ``1 - r`` to fp32 (r ~ 1e-5 loses ~1%)."""
    if foreach and all(isinstance(r, float) for r in rates) and len(set(rates)) == 1:
        torch._foreach_add_(xs, xs, alpha=-rates[0])
        return
    for x, r in zip(xs, rates):
        if isinstance(r, torch.Tensor):
            x.addcmul_(x, r, value=-1.0)
        else:
            x.add_(x, alpha=-r)


def foreach_or_loop(foreach: bool, op: str, tensors: list[torch.Tensor], others: list[Any]) -> None:
    """``tensors[i].op(others[i])`` for every i, as one ``torch._foreach_<op>`` call or a Python loop."""
    if foreach:
        getattr(torch, f"_foreach_{op}")(tensors, others)
    else:
        for t, o in zip(tensors, others):
            getattr(t, op)(o)


def factor_dims(shape: torch.Size | tuple[int, ...], group: dict[str, Any]) -> tuple[int, int] | None:
    """The (row, col) dims whose statistics are kept, or ``None`` for an unfactored second moment."""
    if not group["factored"] or len(shape) < 2:
        return None
    if group["factor_dims"] == "last_two":
        dims = (len(shape) - 2, len(shape) - 1)
    else:  # the two largest; ties go to the later dim, so a square matrix is factored like "last_two"
        order = sorted(range(len(shape)), key=lambda d: (shape[d], d))
        dims = (min(order[-2:]), max(order[-2:]))
    if min(shape[dims[0]], shape[dims[1]]) < group["min_dim_size_to_factor"]:
        return None
    return dims
