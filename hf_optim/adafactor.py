r"""Adafactor with every component a knob, presets for the known variants, and FSDP2 (``DTensor``) support.

.. math::
   \begin{aligned}
   &\textbf{input}: \alpha \text{ (lr)}, \beta_1, c \text{ (decay\_rate)}, \hat\beta \text{ (beta2\_cap)},
      \epsilon_1, \epsilon_2, d, \lambda, \rho_{max} \\
   &\textbf{for } t = 1, 2, \ldots: \\
   &\quad g \leftarrow \pm\nabla f(x_{t-1}) \; (+\lambda x_{t-1} \text{ if mode} = \texttt{l2}), \qquad
      \beta_{2,t} \leftarrow \min(\hat\beta,\; 1 - t^{-c}) \\
   &\quad \textbf{if factored over dims } (i, j):\;
      R \leftarrow \beta_{2,t} R + (1-\beta_{2,t})\,\mathrm{mean}_j(g^2 + \epsilon_1), \;
      C \leftarrow \beta_{2,t} C + (1-\beta_{2,t})\,\mathrm{mean}_i(g^2 + \epsilon_1), \;
      V \leftarrow R\,C / \mathrm{mean}_i(R) \\
   &\quad \textbf{else}: V \leftarrow \beta_{2,t} V + (1-\beta_{2,t})(g^2 + \epsilon_1) \\
   &\quad U \leftarrow g / \sqrt{V}, \qquad U \leftarrow U / \max(1, \mathrm{RMS}(U)/d) \\
   &\quad \rho_t \leftarrow \alpha \min(\rho_{max}, 1/\sqrt{t}) \text{ (relative step) else } \alpha, \qquad
      \alpha_t \leftarrow \rho_t \max(\epsilon_2, \mathrm{RMS}(x_{t-1})) \text{ (scale\_parameter) else } \rho_t \\
   &\quad \Delta \leftarrow \alpha_t\,[m \leftarrow \beta_1 m + (1-\beta_1) U] \text{ (momentum\_before\_lr)}
      \;\text{ or }\; m \leftarrow \beta_1 m + (1-\beta_1)\,\alpha_t U,\; \Delta \leftarrow m \\
   &\quad x_t \leftarrow x_{t-1}\,(1 - r_t) - \Delta, \qquad r_t = \text{the weight-decay mode's rate
      (}\texttt{hf\_optim.decay}\text{) at lr } \alpha \text{ (group) or } \alpha_t \text{ (step)}
   \end{aligned}

With ``eps1_mode="clamp"`` (``torch.optim.Adafactor``) ``ε1`` is not added to ``g²``; instead
``V = R C / max(mean_i R, ε1)`` and ``U = g / max(sqrt(V), ε1)``. Momentum may be stored in bfloat16 (the step
uses the fp32 value before rounding, as optax's ``ema(accumulator_dtype=...)``).

References: Shazeer & Stern 2018 (arXiv:1804.04235); Zhai et al. 2022, *Scaling Vision Transformers*; PaLM
(Chowdhery et al. 2022); T5 (Raffel et al. 2020). Presets and their sources: :mod:`hf_optim._adafactor_presets`.

Implementations (``implementation=``): ``"for-loop"`` (one tensor at a time, one reused scratch buffer),
``"foreach"`` (multi-tensor ops) and ``"compiled"`` (:mod:`hf_optim._compiled`: the whole update of a tensor fused by
``torch.compile`` into a few streaming loops; the first step pays the compilation, seconds per distinct shape, see
``docs/benchmarks.md``). FSDP2 shards, empty tensors and bf16 parameters with stochastic rounding always take the
eager path. ``"auto"``: compiled for groups of at least 2^20 elements where compilation works (a failure, e.g. no
C++ compiler, warns once and stays eager), else foreach off the CPU and the for-loop on the CPU.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, ClassVar

import torch

from . import _compiled
from . import _native_adafactor as _native
from . import _validation as v
from ._adafactor_presets import KNOBS, PRESETS, WEIGHT_DECAY_IS_LR
from ._base import BaseOptimizer, ParamOverrides
from ._distributed import ShardSpec, all_reduce_sum_, check_factorable, local, mean_over, shard_spec
from .decay import decay_rate, l2_coefficient

__all__ = ["Adafactor", "PRESETS", "check_factorable", "factor_dims"]

_MOMENTUM_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16"}
_LOW_PRECISION = (torch.bfloat16, torch.float16)


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


class Adafactor(BaseOptimizer):
    """Adafactor; ``preset`` picks a complete set of knobs (see :mod:`hf_optim._adafactor_presets`).

    Args:
        params: parameters or parameter groups (each group may set any knob).
        lr: learning rate; with ``relative_step=True`` a *multiplier* of ``ρ_t`` (``"multiplier"``) or its cap
            (``relative_step_lr="cap"``, torch). ``None``: the preset's value (1.0 for relative-step presets).
        preset: ``"adafactor_v2"`` (default), ``"hf"``, ``"torch"``, ``"palm"`` or ``"t5"``.
        param_overrides: per-parameter multipliers/values (see :mod:`hf_optim._base`).
        **knobs: override the preset: ``factored``, ``factor_dims`` (``"last_two"``/``"largest_two"``),
            ``min_dim_size_to_factor``, ``beta1`` (None = no momentum), ``momentum_dtype`` (``"float32"``/
            ``"bfloat16"``), ``momentum_before_lr``, ``decay_rate`` (c > 0 in ``1 - t^-c``), ``beta2_cap`` (None =
            no cap), ``eps1`` (None = dtype epsilon), ``eps2``, ``eps1_mode`` (``"add"``/``"clamp"``),
            ``clip_threshold`` (None = no clipping), ``relative_step``, ``rho_max``, ``relative_step_lr``,
            ``warmup_init``, ``scale_parameter``, ``weight_decay``, ``weight_decay_mode``, ``weight_decay_lr``
            (``"group"``: decay uses the group lr; ``"step"``: the effective step ``α_t``, transformers),
            ``decay_as_factor`` (``x *= 1 - r`` with ``1 - r`` rounded to fp32, as torch; default ``x -= r·x``),
            ``maximize``, ``stochastic_rounding`` (bf16 parameters), ``implementation`` (``"auto"``,
            ``"for-loop"``, ``"foreach"``, ``"compiled"``, ``"fused"``: the C kernel of
            :mod:`hf_optim._native_adafactor` for factored fp32 CPU matrices, ``auto`` for the other tensors; ``auto`` uses the kernel too).
    """

    implementations: ClassVar[tuple[str, ...]] = ("for-loop", "foreach", "compiled", "fused")

    def __init__(
        self,
        params: Any,
        lr: float | None = None,
        preset: str = "adafactor_v2",
        *,
        param_overrides: ParamOverrides | None = None,
        **knobs: Any,
    ) -> None:
        v.check_choice("preset", preset, tuple(PRESETS))
        unknown = [k for k in knobs if k not in KNOBS]
        if unknown:
            raise TypeError(
                f"Adafactor got unknown argument(s) {unknown}. Allowed knobs: {list(KNOBS)}."
                f"{v.closest(unknown[0], KNOBS)}"
            )
        defaults = {**PRESETS[preset], **knobs, "preset": preset}
        if lr is not None:
            defaults["lr"] = lr
        super().__init__(params, defaults, param_overrides=param_overrides)
        for group in self.param_groups:
            if group["factored"]:  # FSDP1 flat / DeepSpeed parameters: factoring is impossible, say so now
                check_factorable(group["params"])
            if group["relative_step"] and group["relative_step_lr"] == "multiplier" and group["lr"] < 0.1:
                warnings.warn(
                    f"Adafactor relative_step=True multiplies the relative step min(rho_max, 1/sqrt(t)) by lr="
                    f"{group['lr']}; the usual value is lr=1.0 (transformers' lr=None). Pass relative_step=False to "
                    "use lr as the learning rate.",
                    UserWarning,
                    stacklevel=2,
                )
                break

    def _check_group(self, group: dict[str, Any]) -> None:
        if group.get("weight_decay") == WEIGHT_DECAY_IS_LR:  # PaLM: λ = peak lr, so the decay is lr_t²
            group["weight_decay"] = group.get("lr_peak", group["lr"])
        group["momentum_dtype"] = _DTYPE_ALIASES.get(group["momentum_dtype"], group["momentum_dtype"])
        super()._check_group(group)
        for name in ("factored", "decay_as_factor", "momentum_before_lr", "relative_step", "warmup_init",
                     "scale_parameter", "stochastic_rounding"):
            v.check_bool(name, group[name])
        v.check_choice("factor_dims", group["factor_dims"], ("last_two", "largest_two"))
        size = group["min_dim_size_to_factor"]
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"min_dim_size_to_factor must be an int >= 1, got {size!r}.")
        v.check_unit_interval("beta1", group["beta1"], allow_none=True)
        v.check_choice("momentum_dtype", group["momentum_dtype"], (*_MOMENTUM_DTYPES, *_DTYPE_ALIASES))
        v.check_number("decay_rate", group["decay_rate"])
        if group["decay_rate"] < 0:
            raise ValueError(
                f"decay_rate must be >= 0 (beta2_t = 1 - t^-decay_rate), got {group['decay_rate']!r}. "
                "transformers writes the same schedule as decay_rate=-0.8; here it is 0.8."
            )
        cap = group["beta2_cap"]
        v.check_number("beta2_cap", cap, allow_none=True)
        if cap is not None and not 0.0 < cap <= 1.0:
            raise ValueError(f"beta2_cap must be in (0, 1] or None, got {cap!r}.")
        v.check_non_negative("eps1", group["eps1"], allow_none=True)
        v.check_non_negative("eps2", group["eps2"])
        v.check_choice("eps1_mode", group["eps1_mode"], ("add", "clamp"))
        v.check_positive("clip_threshold", group["clip_threshold"], allow_none=True)
        v.check_positive("rho_max", group["rho_max"])
        v.check_choice("relative_step_lr", group["relative_step_lr"], ("multiplier", "cap"))
        v.check_choice("weight_decay_lr", group["weight_decay_lr"], ("group", "step"))
        if group["warmup_init"] and not (group["relative_step"] and group["relative_step_lr"] == "multiplier"):
            raise ValueError(
                "warmup_init=True needs relative_step=True with relative_step_lr='multiplier' "
                f"(got relative_step={group['relative_step']!r}, relative_step_lr={group['relative_step_lr']!r})."
            )

    # ----------------------------------------------------------------------------------------------------------
    def _init_state(self, p: torch.Tensor, g: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
        dims = factor_dims(p.shape, group)  # global shape: every rank and a single process agree
        # Statistics in fp32 (fp64 for fp64 parameters, so float64 reference checks are exact).
        f32 = dict(dtype=torch.float64 if g.dtype == torch.float64 else torch.float32, device=g.device)
        if dims is not None and "exp_avg_sq_row" not in state:
            row, col = dims
            state["exp_avg_sq_row"] = torch.zeros(g.shape[:col] + g.shape[col + 1:], **f32)
            state["exp_avg_sq_col"] = torch.zeros(g.shape[:row] + g.shape[row + 1:], **f32)
        elif dims is None and "exp_avg_sq" not in state:
            state["exp_avg_sq"] = torch.zeros(g.shape, **f32)
        if group["beta1"] is not None and "exp_avg" not in state:
            state["exp_avg"] = torch.zeros(g.shape, **self._momentum_kwargs(f32, group))
        return state

    @staticmethod
    def _momentum_kwargs(stat_kwargs: dict[str, Any], group: dict[str, Any]) -> dict[str, Any]:
        """bf16 when asked; otherwise the statistics' precision (fp32, or fp64 for fp64 parameters)."""
        if group["momentum_dtype"] == "bfloat16":
            return {**stat_kwargs, "dtype": torch.bfloat16}
        return stat_kwargs

    def _scratch_for(self, g: torch.Tensor) -> torch.Tensor | None:
        """A reusable buffer shaped like ``g`` on CPU (where a fresh 64 MB tensor costs more page faults than the
        whole update); ``None`` elsewhere (the CUDA caching allocator already reuses memory). Not state."""
        if g.device.type != "cpu":
            return None
        cache = self.__dict__.setdefault("_scratch", {})
        buf = cache.get(g.dtype)
        if buf is None or buf.numel() < g.numel():
            buf = cache[g.dtype] = torch.empty(g.numel(), dtype=g.dtype)
        return buf[: g.numel()].view(g.shape)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch, then undo its cast of every state tensor to the parameter dtype (bf16 momentum stays bf16,
        statistics of bf16 parameters stay fp32)."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    continue
                stat_dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
                for key in ("exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq"):
                    if key in state:
                        state[key] = state[key].to(stat_dtype)
                if "exp_avg" in state:
                    state["exp_avg"] = state["exp_avg"].to(self._momentum_kwargs({"dtype": stat_dtype}, group)["dtype"])

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = list(self._params_with_grad(group))
            if not params:
                continue
            _adafactor_group(self, params, group, group["implementation"])
        return loss


# --------------------------------------------------------------------------------------------------------------
# The update rule, as functions over (lists of) local tensors.


def _step_scalars(t: float, group: dict[str, Any]) -> tuple[float, float]:
    """(β2_t, ρ_t) for 1-based step ``t``: ρ_t is the step size before parameter scaling."""
    beta2 = 1.0 - math.pow(t, -group["decay_rate"])
    if group["beta2_cap"] is not None:
        beta2 = min(group["beta2_cap"], beta2)
    lr = group["lr"]
    if not group["relative_step"]:
        return beta2, lr
    if group["relative_step_lr"] == "cap":  # torch.optim.Adafactor: the lr caps 1/sqrt(t)
        return beta2, min(lr, 1.0 / math.sqrt(t))
    ceiling = 1e-6 * t if group["warmup_init"] else group["rho_max"]
    return beta2, lr * min(ceiling, 1.0 / math.sqrt(t))


def _sum_sq_global(x: torch.Tensor, spec: ShardSpec | None) -> torch.Tensor:
    total = torch.linalg.vector_norm(x).square()
    if spec is not None:
        all_reduce_sum_(total, [group for _, group in spec.sharded])
    return total


def _rms(x: torch.Tensor, spec: ShardSpec | None) -> torch.Tensor:
    numel = x.numel() if spec is None else spec.global_shape.numel()
    if spec is None:  # norm / sqrt(n), the form transformers and torch use
        return torch.linalg.vector_norm(x) / math.sqrt(numel)
    return _sum_sq_global(x, spec).sqrt() / math.sqrt(numel)


def _direction(
    g: torch.Tensor, state: dict[str, Any], dims: tuple[int, int] | None, beta2: float, eps1: float,
    eps1_mode: str, spec: ShardSpec | None, scratch: torch.Tensor | None = None,
) -> torch.Tensor:
    """Update the second-moment statistics and return the preconditioned gradient ``U = g / sqrt(V)``.

    ``U`` is written into ``scratch`` (a reused buffer) when given, else into a new tensor.
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


def _stochastic_round_(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Write fp32 ``src`` into bf16 ``dst`` rounding up with probability equal to the discarded fraction."""
    bits = src.view(torch.int32)
    noise = torch.randint_like(bits, 0, 1 << 16)
    dst.copy_(((bits + noise) & -65536).view(torch.float32))  # exact: the low 16 bits are zero


def _resolve(impl: str, params: list[torch.Tensor]) -> str:
    """``auto``: compiled for groups of at least ``AUTO_MIN_NUMEL`` elements where compilation works (its cost, seconds
    per shape, is earned back only by large models); otherwise foreach off the CPU and the for-loop on the CPU (which
    reuses one scratch buffer: fresh large CPU allocations page-fault)."""
    if impl != "auto":
        return impl
    device = local(params[0]).device.type
    if sum(p.numel() for p in params) >= _compiled.AUTO_MIN_NUMEL and not _compiled.compile_broken(device):
        return "compiled"
    return "foreach" if all(local(p).device.type != "cpu" for p in params) else "for-loop"


def _adafactor_group(opt: Adafactor, params: list[torch.Tensor], group: dict[str, Any], impl: str) -> None:
    """One step for the parameters of ``group`` that have gradients."""
    items = []
    for p in params:
        x, g = local(p), local(p.grad)
        state = opt._init_state(p, g, group)
        state["step"] += 1
        # `step` lives on the CPU: no device sync
        items.append((x, g, state, factor_dims(p.shape, group), _step_scalars(state["step"].item(), group), p))
    if impl in ("auto", "fused") and _native.supports_group(group) and _native.library() is not None:
        # The C kernel takes every factored fp32 CPU matrix (on the CPU it beats the other paths at every size).
        native = [it for it in items if shard_spec(it[5]) is None and _native.supports_tensor(it[0], it[1], it[3])]
        for x, g, state, _, (beta2, rho), _ in native:
            _native_step(x, g, state, beta2, rho, group)
        native_ids = {id(it) for it in native}
        items = [it for it in items if id(it) not in native_ids]
    if not items:
        return
    if impl == "fused":
        # What the kernel leaves is usually a handful of norm vectors: one multi-tensor pass beats a Python loop.
        impl = "foreach" if sum(it[0].numel() for it in items) < _compiled.AUTO_MIN_NUMEL else "auto"
    impl = _resolve(impl, [it[5] for it in items])
    if impl == "compiled":
        # FSDP2 shards need cross-rank reductions, empty tensors have nothing to fuse, and stochastic rounding draws
        # eager random bits: those stay on the eager path.
        fast = [it for it in items if shard_spec(it[5]) is None and it[0].numel() > 0
                and not (group["stochastic_rounding"] and it[0].dtype == torch.bfloat16)]
        if fast:
            _compiled.adafactor_group([it[:5] for it in fast], group, lambda sub: _eager_group(opt, sub, group, False))
            fast_ids = {id(it) for it in fast}
            items = [it for it in items if id(it) not in fast_ids]
    if items:
        _eager_group(opt, items, group, impl == "foreach")


def _native_step(x: torch.Tensor, g: torch.Tensor, state: dict[str, Any], beta2: float, rho: float,
                 group: dict[str, Any]) -> None:
    """Step sizes as :func:`_update` computes them, then the C kernel."""
    alpha = rho
    if group["scale_parameter"]:  # max(eps2, RMS(x_{t-1})) · ρ_t
        alpha = max(group["eps2"], torch.linalg.vector_norm(x).item() / math.sqrt(x.numel())) * rho
    rate = 0.0
    if group["weight_decay"]:
        decay_lr = alpha if group["weight_decay_lr"] == "step" else group["lr"]
        rate = decay_rate(group["weight_decay_mode"], group["weight_decay"], decay_lr, group["lr_peak"])
    _native.adafactor_step(
        x, g, state, beta2=beta2, eps1=group["eps1"], clip=group["clip_threshold"], alpha=alpha, decay=rate,
        decay_as_factor=group["decay_as_factor"], maximize=group["maximize"], beta1=group["beta1"],
        momentum_before_lr=group["momentum_before_lr"],
    )


def _eager_group(opt: Adafactor, items: list[tuple[Any, ...]], group: dict[str, Any], foreach: bool) -> None:
    """The eager paths over ``(x, g, state, dims, scalars[, param])`` items whose ``step`` is already counted."""
    xs, x32s, gs, specs, states, dims_list, scalars = [], [], [], [], [], [], []
    l2 = l2_coefficient(group["weight_decay_mode"], group["weight_decay"])
    for x, g, state, dims, scalar, *param in items:
        xs.append(x)
        x32s.append(x.float() if x.dtype in _LOW_PRECISION else x)
        g32 = g.float() if g.dtype in _LOW_PRECISION else g
        if group["maximize"]:
            g32 = -g32
        if l2:
            g32 = g32.add(x32s[-1], alpha=l2)
        gs.append(g32)
        specs.append(shard_spec(param[0]) if param else None)
        states.append(state)
        dims_list.append(dims)
        scalars.append(scalar)

    # for-loop: one tensor at a time through every stage (peak extra memory: one scratch tensor, reused across
    # steps on CPU where fresh large allocations page-fault); foreach: the whole group at once.
    chunks = [list(range(len(xs)))] if foreach else [[i] for i in range(len(xs))]
    for idx in chunks:
        pick = lambda seq: [seq[i] for i in idx]  # noqa: E731
        scratch = None if foreach else opt._scratch_for(gs[idx[0]])
        _update(pick(xs), pick(x32s), pick(gs), pick(specs), pick(states), pick(dims_list), pick(scalars), group,
                foreach, scratch)


def _update(
    xs: list[torch.Tensor], x32s: list[torch.Tensor], gs: list[torch.Tensor], specs: list[ShardSpec | None],
    states: list[dict[str, Any]], dims_list: list[Any], scalars: list[tuple[float, float]], group: dict[str, Any],
    foreach: bool, scratch: torch.Tensor | None,
) -> None:
    """Steps 2-6 of the algorithm for a list of tensors."""
    # Step size α_t: measured on x_{t-1}, before any decay (as transformers and torch).
    alphas: list[Any] = [rho for _, rho in scalars]
    if group["scale_parameter"]:
        alphas = [torch.clamp(_rms(x, s), min=group["eps2"]) * rho for x, s, rho in zip(x32s, specs, alphas)]

    # Preconditioned direction (per tensor: its statistics are reductions over its own dims).
    updates = []
    for x, g, state, dims, spec, (beta2, _) in zip(xs, gs, states, dims_list, specs, scalars):
        eps1 = group["eps1"] if group["eps1"] is not None else torch.finfo(x.dtype).eps  # torch: param dtype
        updates.append(_direction(g, state, dims, beta2, eps1, group["eps1_mode"], spec, scratch))

    clips = None  # 1 / max(1, RMS(U)/d), applied together with the learning rate (one pass over U)
    if group["clip_threshold"] is not None:
        d = group["clip_threshold"]
        if foreach and not any(specs):
            numels = [math.sqrt(u.numel()) * d for u in updates]
            clips = [n.div_(c).clamp_(min=1.0).reciprocal_() for n, c in zip(torch._foreach_norm(updates), numels)]
        else:
            clips = [(_rms(u, s) / d).clamp_(min=1.0).reciprocal_() for u, s in zip(updates, specs)]

    deltas = _momentum(updates, alphas, clips, states, group, foreach)

    # Weight decay x *= 1 - r_t, then x -= Δ.
    lr_peak = group["lr_peak"]
    if group["weight_decay"] and group["weight_decay_mode"] != "l2":
        decay_lrs = alphas if group["weight_decay_lr"] == "step" else [group["lr"]] * len(xs)
        rates = [decay_rate(group["weight_decay_mode"], group["weight_decay"], a, lr_peak) for a in decay_lrs]
        if group["decay_as_factor"]:  # torch.optim.Adafactor: x *= 1 - r, the factor rounded to fp32
            _foreach_or_loop(foreach, "mul_", x32s, [1.0 - r for r in rates])
        else:
            _decay_(x32s, rates, foreach)
    _foreach_or_loop(foreach, "sub_", x32s, deltas)

    for x, x32 in zip(xs, x32s):  # write back low-precision parameters
        if x32 is not x:
            if group["stochastic_rounding"] and x.dtype == torch.bfloat16:
                _stochastic_round_(x, x32)
            else:
                x.copy_(x32)


def _momentum(
    updates: list[torch.Tensor], alphas: list[Any], clips: list[torch.Tensor] | None, states: list[dict[str, Any]],
    group: dict[str, Any], foreach: bool,
) -> list[torch.Tensor]:
    """The tensors Δ to subtract: clip and lr scaling, with β1 momentum before or after the lr scaling.

    ``updates`` are scratch tensors owned by the step and are reused in place.
    """
    beta1, before = group["beta1"], group["momentum_before_lr"]
    if beta1 is None or not before:
        _foreach_or_loop(foreach, "mul_", updates, alphas if clips is None else [c * a for c, a in zip(clips, alphas)])
        if beta1 is None:
            return updates
    elif clips is not None:
        _foreach_or_loop(foreach, "mul_", updates, clips)
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
                moms.append(_ema_low_precision_(u, m, beta1))
    if not before:
        return moms
    if any(m is s for m, s in zip(moms, stored)):  # never scale the state itself
        return [m * a for m, a in zip(moms, alphas)]
    _foreach_or_loop(foreach, "mul_", moms, alphas)
    return moms


def _ema_low_precision_(u: torch.Tensor, m: torch.Tensor, beta1: float, block: int = 1 << 16) -> torch.Tensor:
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


def _decay_(xs: list[torch.Tensor], rates: list[Any], foreach: bool) -> None:
    """``x -= r·x``; written as a subtraction because ``x * (1 - r)`` rounds ``1 - r`` to fp32 (r ~ 1e-5 loses ~1%)."""
    if foreach and all(isinstance(r, float) for r in rates) and len(set(rates)) == 1:
        torch._foreach_add_(xs, xs, alpha=-rates[0])
        return
    for x, r in zip(xs, rates):
        if isinstance(r, torch.Tensor):
            x.addcmul_(x, r, value=-1.0)
        else:
            x.add_(x, alpha=-r)


def _foreach_or_loop(foreach: bool, op: str, tensors: list[torch.Tensor], others: list[Any]) -> None:
    """``tensors[i].op(others[i])`` for every i, as one ``torch._foreach_<op>`` call or a Python loop."""
    if foreach:
        getattr(torch, f"_foreach_{op}")(tensors, others)
    else:
        for t, o in zip(tensors, others):
            getattr(t, op)(o)
