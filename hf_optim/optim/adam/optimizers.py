r"""The Adam family: :class:`Adam`, :class:`AdamW`, :class:`AdamAtan2` and :class:`RAdam`, one update rule with knobs.

All four classes run the rule of :mod:`hf_optim.optim.adam.kernels`:

.. math::
    \begin{aligned}
    &\textbf{input}: \alpha_t \text{ (lr)}, \alpha \text{ (lr\_peak)}, \beta_1, \beta_2, \epsilon, \lambda
        \text{ (weight\_decay)}, \text{mode}, \text{eps\_mode} \\
    &\textbf{for } t = 1, 2, \ldots: \\
    &\quad g_t \leftarrow \pm\nabla f_t(x_{t-1}) \quad (- \text{ if maximize}) \\
    &\quad \textbf{if } \text{mode} = \texttt{l2}: \; g_t \leftarrow g_t + \lambda x_{t-1} \\
    &\quad \textbf{else}: \; x_{t-1} \leftarrow x_{t-1}\,(1 - \alpha_t \lambda'), \quad
        \lambda' = \lambda,\ \lambda/\alpha,\ \lambda\alpha_t/\alpha
        \text{ for coupled, independent, corrected} \\
    &\quad m_t \leftarrow \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad
           v_t \leftarrow \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
    &\quad \hat m_t \leftarrow m_t / (1-\beta_1^t), \qquad \hat v_t \leftarrow v_t / (1-\beta_2^t) \\
    &\quad u_t \leftarrow \begin{cases}
        \hat m_t / (\sqrt{\hat v_t} + \epsilon) & \text{eps\_mode} = \texttt{torch} \\
        \hat m_t / (\sqrt{\hat v_t} + \epsilon / \sqrt{1-\beta_2^t})
            = \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\, m_t / (\sqrt{v_t} + \epsilon)
            & \text{eps\_mode} = \texttt{tf} \text{ (Keras)} \\
        a \operatorname{atan2}(\hat m_t, b \sqrt{\hat v_t}) & \text{AdamAtan2 (no } \epsilon) \\
        \end{cases} \\
    &\quad \textbf{RAdam}: \rho_\infty = \tfrac{2}{1-\beta_2} - 1,\;
           \rho_t = \rho_\infty - \tfrac{2 t \beta_2^t}{1-\beta_2^t};\;
           u_t \leftarrow r_t u_t \text{ if } \rho_t > 5 \text{ else } \hat m_t,\;
           r_t = \sqrt{\tfrac{(\rho_t-4)(\rho_t-2)\rho_\infty}{(\rho_\infty-4)(\rho_\infty-2)\rho_t}} \\
    &\quad x_t \leftarrow x_{t-1} - \alpha_t u_t
    \end{aligned}

Implementations (``implementation=``): ``"for-loop"`` (reference, any dtype), ``"foreach"`` (multi-tensor ops) and,
for :class:`Adam`/:class:`AdamW`, ``"fused"``: torch's fused AdamW/Adam kernels reparametrized, so every decay mode
and both epsilon modes run at fused speed; for :class:`AdamAtan2`/:class:`RAdam`, ``"compiled"``: the same maths as
one ``torch.compile`` graph per shape (:mod:`hf_optim._compiled`; the first step pays the compilation, seconds per
shape). ``"auto"`` picks ``fused`` for Adam/AdamW on CPU/CUDA, ``compiled`` for AdamAtan2/RAdam groups of at least
2^20 elements (falling back to eager, with one warning, where compilation fails) and ``foreach`` otherwise.

Low-precision parameters (bf16/fp16): maths and state in float32; each step works on a float32 copy of the
parameter and writes it back with round-to-nearest-even (``Tensor.copy_``). There are no float32 master weights:
updates smaller than half a bf16 ulp of the weight are lost, as with any bf16-parameter training.

References: Kingma & Ba 2014, "Adam: A Method for Stochastic Optimization"; Loshchilov & Hutter 2019, "Decoupled
Weight Decay Regularization"; Liu et al. 2019, "On the Variance of the Adaptive Learning Rate and Beyond" (RAdam);
Everett et al. 2024, "Scaling Exponents Across Parameterizations and Optimizers" (Adam-atan2); Keras
``keras.optimizers.Adam`` (the ``tf`` epsilon).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

from torch import Tensor

from ... import _compiled
from ... import _validation as v
from ..._base import BaseOptimizer, ParamOverrides, group_defaults
from ..._state_loading import StateSpec, like
from .step import step_group

__all__ = ["Adam", "AdamAtan2", "AdamW", "RAdam"]

EPS_MODES = ("torch", "tf")
_FUSED_DEVICES = ("cpu", "cuda")


class _AdamFamily(BaseOptimizer):
    """Shared step of the family; subclasses choose defaults and the two structural knobs below."""

    _rectify: ClassVar[bool] = False
    _atan2: ClassVar[bool] = False
    eps_knobs: ClassVar[tuple[str, ...]] = ("eps",)
    nonnegative_state: ClassVar[tuple[str, ...]] = ("exp_avg_sq",)

    def _state_specs(self, p: Tensor, group: dict[str, Any]) -> dict[str, StateSpec]:
        # step_group creates all three at once, only for an empty state: a partial state cannot be stepped.
        return {
            "step": StateSpec(None, required=True),
            "exp_avg": like(p, required=True),
            "exp_avg_sq": like(p, required=True),
        }

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        v.check_betas("betas", group["betas"])
        if self._atan2:
            v.check_positive("a", group["a"])
            v.check_non_negative("b", group["b"])
        else:
            v.check_non_negative("eps", group["eps"])
            v.check_choice("eps_mode", group["eps_mode"], EPS_MODES)

    def _resolve(self, group: dict[str, Any], params: list[Tensor]) -> str:
        impl = group["implementation"]
        if impl != "auto":
            return impl
        if "fused" in self.implementations and all(p.device.type in _FUSED_DEVICES for p in params):
            return "fused"
        if (
            "compiled" in self.implementations
            and sum(p.numel() for p in params) >= _compiled.AUTO_MIN_NUMEL
            and not _compiled.compile_broken(params[0].device.type)
        ):
            return "compiled"
        return "foreach"

    def _step_group(self, index: int, group: dict[str, Any]) -> None:
        step_group(self, group)


def _defaults(init: Callable[..., Any], arguments: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`~hf_optim._base.group_defaults`, with ``betas`` stored as a tuple (JSON and --optim_args give lists)."""
    knobs = group_defaults(init, arguments)
    betas = knobs["betas"]
    knobs["betas"] = tuple(betas) if isinstance(betas, list) else betas
    return knobs


class Adam(_AdamFamily):
    r"""Adam (Kingma & Ba 2014) with explicit weight-decay and epsilon semantics.

    .. math::
       \begin{aligned}
       &\textbf{input}: \alpha_t \text{ (lr, scheduled)}, \alpha \text{ (lr\_peak)}, \beta_1, \beta_2,
           \epsilon, \lambda \text{ (weight\_decay)}, \text{mode (weight\_decay\_mode)}, \text{eps\_mode} \\
       &\textbf{initialize}: m_0 \leftarrow 0, \; v_0 \leftarrow 0 \\
       &\textbf{for } t = 1, 2, \ldots: \\
       &\quad g_t \leftarrow \pm\nabla f_t(x_{t-1}) \quad (- \text{ if maximize}) \\
       &\quad \textbf{if } \text{mode} = \texttt{l2}: \; g_t \leftarrow g_t + \lambda x_{t-1} \\
       &\quad \textbf{else}: \; x_{t-1} \leftarrow x_{t-1}\,(1 - r_t), \quad r_t = \lambda\cdot
           \{\alpha_t,\ \alpha_t/\alpha,\ \alpha_t^2/\alpha\} \text{ for coupled, independent, corrected} \\
       &\quad m_t \leftarrow \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad
              v_t \leftarrow \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
       &\quad \hat m_t \leftarrow m_t / (1-\beta_1^t), \qquad \hat v_t \leftarrow v_t / (1-\beta_2^t) \\
       &\quad \textbf{if } \text{eps\_mode} = \texttt{torch}: \;
           x_t \leftarrow x_{t-1} - \alpha_t\, \hat m_t / (\sqrt{\hat v_t} + \epsilon) \\
       &\quad \textbf{else } (\texttt{tf}): \;
           x_t \leftarrow x_{t-1} - \alpha_t \tfrac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\, m_t / (\sqrt{v_t} + \epsilon)
           \quad (= \hat m_t / (\sqrt{\hat v_t} + \epsilon/\sqrt{1-\beta_2^t})) \\
       &\textbf{return } x_t
       \end{aligned}

    With the defaults this is exactly ``torch.optim.Adam``: ``weight_decay_mode="l2"`` adds :math:`\lambda x` to the
    gradient, because that is what "Adam with weight decay" means in PyTorch and in the original paper's setting.
    bf16/fp16 parameters: fp32 maths and state, result written back with round-to-nearest-even.

    References: Kingma & Ba 2014, *Adam: A Method for Stochastic Optimization* (arXiv:1412.6980); Loshchilov &
    Hutter 2019, *Decoupled Weight Decay Regularization* (the decoupled modes); Keras ``keras.optimizers.Adam``
    (the ``tf`` epsilon); ``torch.optim.Adam``.

    Args:
        params: parameters or parameter groups (every knob below may be set per group).
        lr: learning rate :math:`\alpha_t` (schedulers change it; its value at creation is ``lr_peak``).
        betas: :math:`(\beta_1, \beta_2)`, each in [0, 1).
        eps: :math:`\epsilon` (>= 0), placed according to ``eps_mode``.
        weight_decay: :math:`\lambda` (>= 0).
        weight_decay_mode: ``"l2"`` | ``"coupled"`` (torch AdamW) | ``"independent"`` (:math:`\alpha_t/\alpha`)
            | ``"corrected"`` (:math:`\alpha_t^2/\alpha`); see :mod:`hf_optim.decay`.
        eps_mode: ``"torch"`` (:math:`\hat m/(\sqrt{\hat v}+\epsilon)`) or ``"tf"`` (Keras:
            :math:`\epsilon` added to the un-corrected :math:`\sqrt{v}`, i.e. an effective
            :math:`\epsilon/\sqrt{1-\beta_2^t}` that is large early in training).
        maximize: ascend instead of descend.
        implementation: ``"auto"``, ``"for-loop"``, ``"foreach"`` or ``"fused"``.
        state_dtype, state_block_size, state_min_numel, param_update: the memory knobs of every optimizer (state in
            bf16 / int8 / int4 between steps; bf16 weights written back stochastically or with a Kahan buffer):
            :mod:`hf_optim.precision`, docs/memory.md.
        param_overrides: per-parameter ``lr_mult`` / ``weight_decay_mult`` / replacements (muP).
    """

    implementations: ClassVar[tuple[str, ...]] = ("for-loop", "foreach", "fused")
    interop_formats: ClassVar[tuple[str, ...]] = ("torch.optim.Adam/AdamW",)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        weight_decay_mode: str = "l2",
        eps_mode: str = "torch",
        maximize: bool = False,
        implementation: str = "auto",
        state_dtype: str = "float32",
        state_block_size: int = 256,
        state_min_numel: int = 4096,
        param_update: str = "nearest",
        param_overrides: ParamOverrides | None = None,
    ) -> None:
        super().__init__(params, _defaults(Adam.__init__, locals()), param_overrides=param_overrides)


class AdamW(Adam):
    r"""AdamW (Loshchilov & Hutter 2019): :class:`Adam` with ``weight_decay_mode="coupled"`` and ``weight_decay=1e-2``.

    .. math::
       \begin{aligned}
       &\textbf{input}: \alpha_t \text{ (lr, scheduled)}, \alpha \text{ (lr\_peak)}, \beta_1, \beta_2,
           \epsilon, \lambda \text{ (weight\_decay)}, \text{mode}, \text{eps\_mode} \\
       &\textbf{initialize}: m_0 \leftarrow 0, \; v_0 \leftarrow 0 \\
       &\textbf{for } t = 1, 2, \ldots: \\
       &\quad g_t \leftarrow \pm\nabla f_t(x_{t-1}) \\
       &\quad x_{t-1} \leftarrow x_{t-1}\,(1 - r_t), \quad r_t = \begin{cases}
           \alpha_t \lambda & \texttt{coupled} \text{ (default, = torch.optim.AdamW)} \\
           (\alpha_t/\alpha)\,\lambda & \texttt{independent} \text{ (the paper's schedule-only decay)} \\
           (\alpha_t^2/\alpha)\,\lambda & \texttt{corrected} \text{ (PaLM's } \alpha_t^2 \text{ when } \lambda = \alpha)
           \end{cases} \\
       &\quad (\texttt{l2}: r_t = 0 \text{ and } g_t \leftarrow g_t + \lambda x_{t-1} \text{ instead}) \\
       &\quad m_t \leftarrow \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad
              v_t \leftarrow \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
       &\quad \hat m_t \leftarrow m_t / (1-\beta_1^t), \qquad \hat v_t \leftarrow v_t / (1-\beta_2^t) \\
       &\quad x_t \leftarrow x_{t-1} - \alpha_t\, \hat m_t / (\sqrt{\hat v_t} + \epsilon_t), \quad
           \epsilon_t = \epsilon \;(\texttt{torch}) \text{ or } \epsilon/\sqrt{1-\beta_2^t} \;(\texttt{tf}) \\
       &\textbf{return } x_t
       \end{aligned}

    The defaults equal ``torch.optim.AdamW`` (:math:`x \leftarrow x(1-\alpha_t\lambda)`), so existing
    hyperparameters (LLaMA/GPT-3 ``weight_decay=0.1``) keep their meaning. For decay that follows only the schedule,
    as in the paper, use ``weight_decay_mode="independent"`` with :math:`\lambda \approx 10^{-5}..10^{-4}`
    (``independent`` λ equals torch AdamW's ``weight_decay = λ/lr_peak``). Arguments as :class:`Adam`.

    References: Loshchilov & Hutter 2019, *Decoupled Weight Decay Regularization* (ICLR, arXiv:1711.05101); Kingma &
    Ba 2014 (Adam); ``torch.optim.AdamW``; MosaicML Composer ``DecoupledAdamW`` (``independent``).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        weight_decay_mode: str = "coupled",
        eps_mode: str = "torch",
        maximize: bool = False,
        implementation: str = "auto",
        state_dtype: str = "float32",
        state_block_size: int = 256,
        state_min_numel: int = 4096,
        param_update: str = "nearest",
        param_overrides: ParamOverrides | None = None,
    ) -> None:
        super().__init__(params, **group_defaults(AdamW.__init__, locals()), param_overrides=param_overrides)


class AdamAtan2(_AdamFamily):
    r"""Adam-atan2 (Everett et al. 2024): :math:`u_t = a\,\operatorname{atan2}(\hat m_t, b\sqrt{\hat v_t})`.

    ``atan2`` replaces the division and removes :math:`\epsilon`: the update is bounded by :math:`a\pi/2`, defined
    when :math:`\hat v_t = 0`, and invariant to rescaling the gradient. The paper's constants are the defaults:
    :math:`a = 1.27 \approx 4/\pi`, so that :math:`|\hat m| = b\sqrt{\hat v}` gives an update of 1 as in Adam, and
    :math:`b = 1`. Decay defaults to ``"coupled"`` with :math:`\lambda = 10^{-2}` like :class:`AdamW`, since the method is
    an AdamW replacement. Implementations: ``"for-loop"``, ``"foreach"``, ``"compiled"`` (torch has no fused kernel
    for atan2).

    .. math::
       \begin{aligned}
       &\textbf{for } t = 1, 2, \ldots: \; g_t,\ \text{decay},\ m_t,\ v_t,\ \hat m_t,\ \hat v_t
           \text{ as in Adam} \\
       &\quad x_t \leftarrow x_{t-1} - \alpha_t\, a \operatorname{atan2}(\hat m_t,\; b \sqrt{\hat v_t})
       \end{aligned}

    ``b = 0`` is allowed: :math:`\operatorname{atan2}(\hat m, 0) = \tfrac{\pi}{2}\operatorname{sign}(\hat m)`, a
    sign-momentum step of size :math:`a\pi/2`.

    Args: ``params, lr, betas, a, b, weight_decay, weight_decay_mode, maximize, implementation, param_overrides``
    as :class:`Adam` (``a > 0``, ``b >= 0``).

    References: Everett et al. 2024, *Scaling Exponents Across Parameterizations and Optimizers* (arXiv:2407.05872).
    """

    _atan2 = True
    implementations: ClassVar[tuple[str, ...]] = ("for-loop", "foreach", "compiled")

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 1e-2,
        *,
        a: float = 1.27,
        b: float = 1.0,
        weight_decay_mode: str = "coupled",
        maximize: bool = False,
        implementation: str = "auto",
        state_dtype: str = "float32",
        state_block_size: int = 256,
        state_min_numel: int = 4096,
        param_update: str = "nearest",
        param_overrides: ParamOverrides | None = None,
    ) -> None:
        super().__init__(params, _defaults(AdamAtan2.__init__, locals()), param_overrides=param_overrides)


class RAdam(_AdamFamily):
    r"""RAdam (Liu et al. 2019): Adam with the variance rectification :math:`r_t`; momentum steps while
    :math:`\rho_t \le 5`.

    .. math::
       \begin{aligned}
       &\textbf{input}: \alpha_t, \alpha \text{ (lr\_peak)}, \beta_1, \beta_2, \epsilon, \lambda, \text{mode},
           \text{eps\_mode}; \quad \rho_\infty \leftarrow 2/(1-\beta_2) - 1 \\
       &\textbf{initialize}: m_0 \leftarrow 0, \; v_0 \leftarrow 0 \\
       &\textbf{for } t = 1, 2, \ldots: \\
       &\quad g_t \leftarrow \pm\nabla f_t(x_{t-1}) \; (+\lambda x_{t-1} \text{ if } \texttt{l2}), \qquad
           x_{t-1} \leftarrow x_{t-1}(1 - r_t) \text{ (decoupled modes, as in Adam)} \\
       &\quad m_t \leftarrow \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad
              v_t \leftarrow \beta_2 v_{t-1} + (1-\beta_2) g_t^2, \qquad \hat m_t \leftarrow m_t/(1-\beta_1^t) \\
       &\quad \rho_t \leftarrow \rho_\infty - 2 t \beta_2^t / (1-\beta_2^t) \\
       &\quad \textbf{if } \rho_t > 5: \;
           r_t \leftarrow \sqrt{\tfrac{(\rho_t-4)(\rho_t-2)\rho_\infty}{(\rho_\infty-4)(\rho_\infty-2)\rho_t}}, \;
           x_t \leftarrow x_{t-1} - \alpha_t r_t \hat m_t\, \ell_t, \;
           \ell_t = \begin{cases} \sqrt{1-\beta_2^t} / (\sqrt{v_t} + \epsilon) & \texttt{tf} \text{ (default)} \\
                                   1 / (\sqrt{v_t/(1-\beta_2^t)} + \epsilon) & \texttt{torch} \end{cases} \\
       &\quad \textbf{else}: \; x_t \leftarrow x_{t-1} - \alpha_t \hat m_t \\
       &\textbf{return } x_t
       \end{aligned}

    References: Liu et al. 2019, *On the Variance of the Adaptive Learning Rate and Beyond* (ICLR 2020,
    arXiv:1908.03265); ``torch.optim.RAdam``.

    Defaults equal ``torch.optim.RAdam``: ``weight_decay_mode="l2"`` (torch's ``decoupled_weight_decay=True`` is
    ``"coupled"``) and ``eps_mode="tf"``, because torch and the authors' code add :math:`\epsilon` to the
    un-corrected :math:`\sqrt{v_t}` (``eps_mode="torch"`` gives :math:`r_t \hat m_t/(\sqrt{\hat v_t}+\epsilon)`).
    Implementations: ``"for-loop"``, ``"foreach"``, ``"compiled"``. Arguments as :class:`Adam`.
    """

    _rectify = True
    implementations: ClassVar[tuple[str, ...]] = ("for-loop", "foreach", "compiled")
    interop_formats: ClassVar[tuple[str, ...]] = ("torch.optim.RAdam",)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        weight_decay_mode: str = "l2",
        eps_mode: str = "tf",
        maximize: bool = False,
        implementation: str = "auto",
        state_dtype: str = "float32",
        state_block_size: int = 256,
        state_min_numel: int = 4096,
        param_update: str = "nearest",
        param_overrides: ParamOverrides | None = None,
    ) -> None:
        super().__init__(params, _defaults(RAdam.__init__, locals()), param_overrides=param_overrides)
