r"""Adafactor with every component a knob, presets for the known variants, and FSDP2 (``DTensor``) support.

This module holds the optimizer class (knobs, validation, state); which implementation steps which tensors is
:mod:`hf_optim.optim.adafactor.dispatch`. The update rule is stated in :class:`Adafactor`'s docstring; its eager
implementation is :mod:`hf_optim.optim.adafactor.rule`, the compiled one :mod:`hf_optim._compiled`, the C kernel for
factored fp32 CPU matrices :mod:`hf_optim.optim.adafactor.native`.
Presets and their sources: :mod:`hf_optim.optim.adafactor.presets`.

Implementations (``implementation=``): ``"for-loop"`` (one tensor at a time, one reused scratch buffer),
``"foreach"`` (multi-tensor ops), ``"compiled"`` (``torch.compile`` fuses the whole update of a tensor into a few
streaming loops; the first step pays the compilation, seconds per distinct shape, see ``docs/benchmarks.md``) and
``"fused"`` (the C kernel). FSDP2 shards, empty tensors and bf16 parameters with stochastic rounding always take the
eager path. ``"auto"``: the C kernel for factored fp32 CPU matrices, compiled for groups of at least 2^20 elements
where compilation works (a failure, e.g. no C++ compiler, warns once and stays eager), else foreach off the CPU and
the for-loop on the CPU.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from ... import _validation as v
from ... import precision
from ..._base import BaseOptimizer, ParamOverrides
from ..._distributed import check_factorable, factoring_impossible, local
from ..._state_loading import STEP, StateSpec
from .dispatch import step_group
from .presets import KNOBS, PRESETS, WEIGHT_DECAY_IS_LR
from .rule import factor_dims

__all__ = ["PRESETS", "Adafactor", "check_factorable", "factor_dims"]


class Adafactor(BaseOptimizer):
    r"""Adafactor (Shazeer & Stern 2018) with every component a knob; ``preset`` picks a complete set of knobs.

    .. math::
       \begin{aligned}
       &\textbf{input}: \alpha_t \text{ (lr, scheduled)}, \alpha \text{ (lr\_peak)}, \beta_1, c \text{ (decay\_rate)},
          \hat\beta \text{ (beta2\_cap)}, \epsilon_1, \epsilon_2, d \text{ (clip\_threshold)}, \lambda, \rho_{max} \\
       &\textbf{for } t = 1, 2, \ldots: \\
       &\quad g \leftarrow \pm\nabla f(x_{t-1}) \; (+\lambda x_{t-1} \text{ if mode} = \texttt{l2}), \qquad
          \beta_{2,t} \leftarrow \min(\hat\beta,\; 1 - t^{-c}) \\
       &\quad \textbf{if factored over dims } (i, j):\;
          R \leftarrow \beta_{2,t} R + (1-\beta_{2,t})\,\mathrm{mean}_j(g^2 + \epsilon_1), \;
          C \leftarrow \beta_{2,t} C + (1-\beta_{2,t})\,\mathrm{mean}_i(g^2 + \epsilon_1), \;
          V \leftarrow R\,C / \mathrm{mean}_i(R) \\
       &\quad \textbf{else}: V \leftarrow \beta_{2,t} V + (1-\beta_{2,t})(g^2 + \epsilon_1) \\
       &\quad U \leftarrow g / \sqrt{V}, \qquad U \leftarrow U / \max(1, \mathrm{RMS}(U)/d) \\
       &\quad \rho_t \leftarrow \alpha_t \min(\rho_{max}, 1/\sqrt{t}) \text{ (relative step) else } \alpha_t, \qquad
          s_t \leftarrow \rho_t \max(\epsilon_2, \mathrm{RMS}(x_{t-1})) \text{ (scale\_parameter) else } \rho_t \\
       &\quad \Delta \leftarrow s_t\,[m \leftarrow \beta_1 m + (1-\beta_1) U] \text{ (momentum\_before\_lr)}
          \;\text{ or }\; m \leftarrow \beta_1 m + (1-\beta_1)\,s_t U,\; \Delta \leftarrow m \\
       &\quad x_t \leftarrow x_{t-1} - r_t\,x_{t-1} - \Delta, \qquad r_t = \lambda\cdot
          \{\ell,\ \ell/\alpha,\ \ell^2/\alpha\} \text{ for coupled, independent, corrected}, \;
          \ell = \alpha_t \text{ (weight\_decay\_lr=group) or } s_t \text{ (step)}
       \end{aligned}

    Without momentum (``beta1=None``) :math:`\Delta = s_t U`; ``relative_step_lr="cap"`` (torch) uses
    :math:`\min(\alpha_t, 1/\sqrt t)`, ``warmup_init`` :math:`\min(10^{-6} t, 1/\sqrt t)`. With ``eps1_mode="clamp"``
    (``torch.optim.Adafactor``) :math:`\epsilon_1` is not added to :math:`g^2`; instead
    :math:`V = R C / \max(\mathrm{mean}_i R, \epsilon_1)` and :math:`U = g / \max(\sqrt V, \epsilon_1)`.

    Precision: statistics in fp32 (fp64 for fp64 parameters). Momentum in ``momentum_dtype`` (bf16 in
    ``adafactor_v2``): the step uses the fp32 average, the state keeps it rounded, as optax's
    ``ema(accumulator_dtype=...)``. **bf16/fp16 parameters** get fp32 maths on an fp32 copy, written back with
    **round-to-nearest-even** (``Tensor.copy_``) by default; ``stochastic_rounding=True`` rounds bf16 up or down at
    random instead (unbiased, so updates below half an ulp are not lost on average). There are no fp32 master weights.

    References: Shazeer & Stern 2018, *Adafactor: Adaptive Learning Rates with Sublinear Memory Cost*
    (arXiv:1804.04235); Zhai et al. 2022, *Scaling Vision Transformers* (big_vision; ``adafactor_v2``); Chowdhery et
    al. 2022, *PaLM*; Raffel et al. 2020, *T5*; ``transformers.optimization.Adafactor``; ``torch.optim.Adafactor``.

    Args:
        params: parameters or parameter groups (each group may set any knob).
        lr: learning rate; with ``relative_step=True`` a *multiplier* of ``ρ_t`` (``"multiplier"``) or its cap
            (``relative_step_lr="cap"``, torch). ``None``: the preset's value (1.0 for relative-step presets).
        preset: ``"adafactor_v2"`` (default), ``"hf"``, ``"torch"``, ``"palm"`` or ``"t5"``.
        param_overrides: per-parameter multipliers/values (see :mod:`hf_optim._base`).
        **knobs: override the preset: ``factored``, ``factor_dims`` (``"last_two"``/``"largest_two"``),
            ``min_dim_size_to_factor`` (int >= 1), ``beta1`` (None = no momentum), ``momentum_dtype``
            (``"float32"``/``"bfloat16"``), ``momentum_before_lr``, ``decay_rate`` (c > 0 in ``1 - t^-c``),
            ``beta2_cap`` (in (0, 1], None = no cap), ``eps1`` (> 0; None = the parameter dtype's machine epsilon),
            ``eps2`` (>= 0), ``eps1_mode`` (``"add"``/``"clamp"``), ``clip_threshold`` (> 0, None = no clipping),
            ``max_ignores_nan`` (a NaN RMS(U) or RMS(x) gives the floor 1 or eps2, as torch's Python ``max``;
            default: NaN propagates),
            ``relative_step``, ``rho_max`` (> 0), ``relative_step_lr``, ``warmup_init``, ``scale_parameter``,
            ``weight_decay`` (>= 0, or ``"lr"``: the group's peak lr, PaLM), ``weight_decay_mode``,
            ``weight_decay_lr`` (``"group"``: decay uses the group lr; ``"step"``: the effective step ``s_t``,
            transformers), ``decay_as_factor`` (``x *= 1 - r`` with ``1 - r`` rounded to fp32, as torch; default
            ``x -= r·x``), ``maximize``, ``stochastic_rounding`` (bf16 parameters), ``implementation``.
    """

    implementations: ClassVar[tuple[str, ...]] = ("for-loop", "foreach", "compiled", "fused")
    interop_formats: ClassVar[tuple[str, ...]] = ("torch.optim.Adafactor", "transformers Adafactor")
    #: Like torch.optim.Adafactor: the factored statistics of a complex tensor have no meaning.
    supports_complex: ClassVar[bool] = False
    eps_knobs: ClassVar[tuple[str, ...]] = ("eps1",)
    nonnegative_state: ClassVar[tuple[str, ...]] = ("exp_avg_sq",)

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

    @staticmethod
    def _resolve_group_value(name: str, value: Any, group: Mapping[str, Any], defaults: Mapping[str, Any]) -> Any:
        """PaLM's ``weight_decay="lr"`` is the group's peak lr; resolved before a ``weight_decay_mult`` scales it."""
        if name == "weight_decay" and isinstance(value, str) and value == WEIGHT_DECAY_IS_LR:
            return group.get("lr_peak", group.get("lr", defaults["lr"]))
        return value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        # Remembered so that a later swap of the group's matrices for flat partitions (DeepSpeed ZeRO-1/2 does this
        # after construction) is caught when state is first created instead of silently running unfactored.
        had_matrices = any(factor_dims(p.shape, group) is not None for p in group["params"])
        self.__dict__.setdefault("_had_matrices", []).append(had_matrices)

    def _check_group(self, group: dict[str, Any]) -> None:
        group["weight_decay"] = self._resolve_group_value("weight_decay", group.get("weight_decay"), group, group)
        group["momentum_dtype"] = precision.canonical_dtype_name(group["momentum_dtype"])
        super()._check_group(group)
        for name in (
            "factored",
            "decay_as_factor",
            "momentum_before_lr",
            "relative_step",
            "warmup_init",
            "scale_parameter",
            "stochastic_rounding",
            "max_ignores_nan",
        ):
            v.check_bool(name, group[name])
        v.check_choice("factor_dims", group["factor_dims"], ("last_two", "largest_two"))
        size = group["min_dim_size_to_factor"]
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"min_dim_size_to_factor must be an int >= 1, got {size!r}.")
        v.check_unit_interval("beta1", group["beta1"], allow_none=True)
        v.check_choice(
            "momentum_dtype", group["momentum_dtype"], (*precision.STATE_DTYPE_NAMES, *precision.DTYPE_ALIASES)
        )
        v.check_number("decay_rate", group["decay_rate"])
        if group["decay_rate"] <= 0:
            raise ValueError(
                f"decay_rate must be > 0 (beta2_t = 1 - t^-decay_rate; 0 would give beta2_t = 0, no averaging), got "
                f"{group['decay_rate']!r}. transformers writes the same schedule as decay_rate=-0.8; here it is 0.8."
            )
        cap = group["beta2_cap"]
        v.check_number("beta2_cap", cap, allow_none=True)
        if cap is not None and not 0.0 < cap <= 1.0:
            raise ValueError(f"beta2_cap must be in (0, 1] or None, got {cap!r}.")
        v.check_number("eps1", group["eps1"], allow_none=True)
        if group["eps1"] is not None and group["eps1"] <= 0:
            # Both modes divide by it on an all-zero gradient row (V = 0): 0/0 = NaN in the parameters.
            raise ValueError(
                f"eps1 must be > 0 (or None: the parameter dtype's machine epsilon), got {group['eps1']!r}: with "
                f"eps1 = 0 a gradient row or column of zeros gives V = 0 and an update 0/0 = NaN."
            )
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

    @classmethod
    def knob_names(cls) -> tuple[str, ...]:
        return (*KNOBS, "preset")

    def _check_group_params(self, group: dict[str, Any], params: Any) -> None:
        super()._check_group_params(group, params)
        eps1 = group["eps1"]
        if (
            group["eps1_mode"] == "clamp"
            and isinstance(eps1, float)
            and eps1 * eps1 < torch.finfo(torch.float32).tiny
            and any(precision.statistic_dtype(p) == torch.float32 for p in params)
        ):
            # clamp mode bounds V below by eps1²: a square that underflows in fp32 leaves V = 0 (0/0 for zero rows).
            raise ValueError(
                f"eps1={eps1!r} with eps1_mode='clamp': eps1**2 = {eps1 * eps1:.3g} underflows in float32 (the compute "
                f"dtype), so a zero gradient gives 0/0 = NaN. Use eps1 >= {math.sqrt(torch.finfo(torch.float32).tiny):.3g}"
                " or None (the dtype's machine epsilon, torch's default)."
            )

    def _state_specs(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, StateSpec]:
        shape = tuple(local(p).shape)
        dims = factor_dims(p.shape, group)  # from the global shape, as _init_state
        specs = {"step": STEP, "exp_avg": StateSpec(shape, like_param=True)}
        # the second moment is created with the first step's state, never later: a state without it is not Adafactor's
        if dims is None:
            specs["exp_avg_sq"] = StateSpec(shape, required=True)
        else:
            row, col = dims
            specs["exp_avg_sq_row"] = StateSpec(shape[:col] + shape[col + 1 :], required=True)
            specs["exp_avg_sq_col"] = StateSpec(shape[:row] + shape[row + 1 :], required=True)
        return specs

    def _check_still_factorable(self, index: int, group: dict[str, Any]) -> None:
        """Run when a group first creates state: the checks of construction, on the tensors the group holds *now*.

        DeepSpeed ZeRO-1/2 replace ``group["params"]`` by one flat 1-D fp32 partition after the optimizer was built;
        without this check Adafactor would silently fall back to an unfactored second moment on it.
        """
        check_factorable(group["params"])  # FlatParameter / DeepSpeed-marked tensors swapped in later
        had = getattr(self, "_had_matrices", [])
        if index < len(had) and had[index] and all(factor_dims(p.shape, group) is None for p in group["params"]):
            shapes = ", ".join(f"{tuple(p.shape)}" for p in group["params"][:3])
            raise factoring_impossible(
                f"only tensors {shapes}{' ...' if len(group['params']) > 3 else ''} in a parameter group that held "
                "factorable matrices when the optimizer was created (flat 1-D partitions swapped in afterwards, as "
                "DeepSpeed ZeRO-1/2 do)"
            )

    def _init_state(self, p: torch.Tensor, g: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = self.state[p]
        if "step" not in state:
            state["step"] = precision.new_step()
        dims = factor_dims(p.shape, group)  # global shape: every rank and a single process agree
        # fp64 statistics for fp64 parameters, so float64 reference checks are exact
        f32 = dict(dtype=precision.statistic_dtype(g), device=g.device)
        if dims is not None and "exp_avg_sq_row" not in state:
            row, col = dims
            state["exp_avg_sq_row"] = torch.zeros(g.shape[:col] + g.shape[col + 1 :], **f32)
            state["exp_avg_sq_col"] = torch.zeros(g.shape[:row] + g.shape[row + 1 :], **f32)
        elif dims is None and "exp_avg_sq" not in state:
            state["exp_avg_sq"] = torch.zeros(g.shape, **f32)
        if group["beta1"] is not None and "exp_avg" not in state:
            state["exp_avg"] = torch.zeros(g.shape, **self._momentum_kwargs(f32, group))
        return state

    @staticmethod
    def _momentum_kwargs(stat_kwargs: dict[str, Any], group: dict[str, Any]) -> dict[str, Any]:
        """bf16 when asked; otherwise the statistics' precision (fp32, or fp64 for fp64 parameters)."""
        if group["momentum_dtype"] != "float32":
            return {**stat_kwargs, "dtype": precision.named_dtype(group["momentum_dtype"])}
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

    def _state_dtype_for(self, key: str, p: torch.Tensor, group: Mapping[str, Any]) -> torch.dtype:
        stat_dtype = precision.statistic_dtype(p)
        return self._momentum_kwargs({"dtype": stat_dtype}, group)["dtype"] if key == "exp_avg" else stat_dtype

    def _step_group(self, index: int, group: dict[str, Any]) -> None:
        params = list(self._params_with_grad(group))
        if not params:
            return
        if group["factored"] and any(not self.state.get(p) for p in params):
            self._check_still_factorable(index, group)
        step_group(self, params, group, group["implementation"])
