"""The step skeleton shared by the element-wise optimizers SGDW, AdaGrad and RMSProp.

Everything these three do *around* their update rule is identical, so it lives here once:

1. collect the parameters that have a gradient (sparse gradients raise, complex parameters raise);
2. choose the path: ``"foreach"`` runs the rule once per (device, dtype) bucket on lists of tensors with
   ``torch._foreach_*`` kernels; ``"for-loop"`` runs the *same* rule once per parameter on one-element lists, which
   keeps temporaries to one tensor at a time. ``"auto"`` picks ``"foreach"`` when every parameter is a plain
   floating-point ``Tensor`` on CPU or CUDA, like torch's default;
3. bf16/fp16 parameters: the rule runs on an fp32 copy with fp32 gradients and fp32 state, and the result is written
   back with round to nearest even (:mod:`hf_optim.precision`);
4. ``maximize`` (``g ← -g``) and ``l2`` decay (``g ← g + λx``) build a *new* gradient list (``p.grad`` is never
   modified), in that order, as torch does;
5. the step counter (if the class keeps one) is incremented, and the decoupled decay modes multiply the parameter by
   ``1 - rate`` *before* the rule, with ``rate`` from :func:`hf_optim.decay.decay_rate` evaluated at the step size the
   class reports for this parameter (:meth:`ElementwiseOptimizer._step_sizes`).

A subclass provides :meth:`_init_state` and :meth:`_update`; the rule must treat ``grads`` as read-only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .. import precision
from .._base import BaseOptimizer
from .._state_loading import STEP, StateSpec, like
from ..decay import decay_rate, l2_coefficient

#: Devices with ``torch._foreach_*`` kernels (CPU runs them as a loop, CUDA as multi-tensor kernels).
FOREACH_DEVICES = ("cpu", "cuda")

State = dict[str, Any]


def choose_implementation(requested: str, params: list[torch.Tensor]) -> str:
    """Resolve ``"auto"``: ``"foreach"`` for plain floating-point tensors on CPU/CUDA, else ``"for-loop"``."""
    if requested != "auto":
        return requested
    ok = all(
        type(p) in (torch.Tensor, torch.nn.Parameter) and p.device.type in FOREACH_DEVICES and p.is_floating_point()
        for p in params
    )
    return "foreach" if ok else "for-loop"


def apply_decoupled_decay(params: list[torch.Tensor], rates: list[float]) -> None:
    """``x ← x·(1 - rate)`` in place, one rate per tensor; no-op where every rate is 0."""
    if not any(rates):
        return
    if len(set(rates)) == 1:
        torch._foreach_mul_(params, 1.0 - rates[0])
    else:
        torch._foreach_mul_(params, [1.0 - rate for rate in rates])


def effective_grads(
    params: list[torch.Tensor], grads: list[torch.Tensor], *, maximize: bool, l2: float
) -> list[torch.Tensor]:
    """``±g + λ·x`` as new tensors where anything changes (the caller's gradients are never written to)."""
    if maximize:
        grads = torch._foreach_neg(grads)
    if l2 != 0:
        grads = torch._foreach_add(grads, params, alpha=l2)
    return grads


def state_tensor(
    state: State, key: str, like: torch.Tensor, make: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """``state[key]``, created with ``make(like)`` on first use (``like`` is the work tensor, in the compute dtype).

    A buffer may be switched on mid-run (momentum set on a group later), so it is created where it is first read.
    Its dtype after loading is restored once, by :meth:`hf_optim._base.BaseOptimizer._normalize_state_dtypes`.
    """
    value = state.get(key)
    if value is None:
        value = state[key] = make(like)
    return value


def zeros_like(t: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(t, memory_format=torch.preserve_format)


class ElementwiseOptimizer(BaseOptimizer):
    """Base of SGDW, AdaGrad and RMSProp: the shared step (see the module docstring); subclasses add the rule."""

    implementations = ("for-loop", "foreach")
    #: Whether the class keeps ``state["step"]`` (a float32 0-d tensor, as torch). SGD does not, like torch.
    counts_steps: bool = True
    #: The per-parameter state tensors a subclass may keep (all shaped like the parameter).
    state_keys: tuple[str, ...] = ()
    eps_knobs = ("eps",)

    def _state_specs(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, StateSpec]:
        # torch.optim.SGD stores momentum_buffer=None when it runs without momentum.
        specs = {key: like(p, optional=True) for key in self.state_keys}
        return {**specs, "step": STEP} if self.counts_steps else specs

    # --- what a subclass provides -------------------------------------------------------------------------------
    def _init_state(self, group: dict[str, Any], state: State, param: torch.Tensor) -> None:
        """Create the state of one parameter (``param`` is the fp32/fp64 working tensor)."""
        raise NotImplementedError

    def _step_sizes(self, group: dict[str, Any], steps: list[float]) -> list[float]:
        """The learning rate that scales this step's update of each parameter (also used by decoupled decay)."""
        return [group["lr"]] * len(steps)

    def _update(
        self,
        group: dict[str, Any],
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        states: list[State],
        lrs: list[float],
    ) -> None:
        """Apply the rule in place to ``params`` (same device and dtype); ``grads`` are read-only."""
        raise NotImplementedError

    # --- the shared step ---------------------------------------------------------------------------------------
    def _step_group(self, index: int, group: dict[str, Any]) -> None:
        params = list(self._params_with_grad(group))
        if not params:
            return
        if choose_implementation(group["implementation"], params) == "foreach":
            buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
            for p in params:
                buckets.setdefault((p.device, precision.compute_dtype(p)), []).append(p)
            batches = list(buckets.values())
        else:
            batches = [[p] for p in params]
        for batch in batches:
            self._step_batch(group, batch)

    def _step_batch(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        mode = precision.param_update_mode(group)
        work = [precision.work_copy(p, self.state[p], mode) for p in params]
        grads = [p.grad if p.grad.dtype == w.dtype else p.grad.to(w.dtype) for p, w in zip(params, work)]
        l2 = l2_coefficient(group["weight_decay_mode"], group["weight_decay"])
        grads = effective_grads(work, grads, maximize=group["maximize"], l2=l2)
        states = [self.state[p] for p in params]
        for state, w in zip(states, work):
            if not state:
                self._init_state(group, state, w)
        if any(p.is_complex() for p in params):
            self._step_complex(group, params, work, grads, states)
            return
        self._step_real(group, params, work, grads, states)

    def _step_complex(
        self,
        group: dict[str, Any],
        params: list[torch.Tensor],
        work: list[torch.Tensor],
        grads: list[torch.Tensor],
        states: list[State],
    ) -> None:
        """Complex parameters as torch steps them: real and imaginary parts are independent coordinates. The rule
        runs on real views; the state stays complex (as torch keeps it), so state dicts are interchangeable."""
        as_real = [torch.view_as_real(x) if x.is_complex() else x for x in work]
        real_grads = [torch.view_as_real(g) if g.is_complex() else g for g in grads]
        views = [
            {k: torch.view_as_real(v) if torch.is_tensor(v) and v.is_complex() else v for k, v in s.items()}
            for s in states
        ]
        self._step_real(group, params, as_real, real_grads, views)
        for p, state, view in zip(params, states, views):
            for key, value in view.items():
                if (
                    p.is_complex()
                    and torch.is_tensor(value)
                    and not value.is_complex()
                    and value.dim() > 0
                    and value.shape[-1] == 2
                    and key != "step"
                ):
                    # a buffer created (or replaced) on the real view: store it complex again
                    if not (
                        torch.is_tensor(state.get(key))
                        and state[key].is_complex()
                        and torch.view_as_real(state[key]).data_ptr() == value.data_ptr()
                    ):
                        state[key] = torch.view_as_complex(value.contiguous())
                else:
                    state[key] = value

    def _step_real(
        self,
        group: dict[str, Any],
        params: list[torch.Tensor],
        work: list[torch.Tensor],
        grads: list[torch.Tensor],
        states: list[State],
    ) -> None:
        steps: list[float] = [0.0] * len(params)
        if self.counts_steps:
            for s in states:
                if "step" not in s:
                    s["step"] = precision.new_step()
            step_tensors = [s["step"] for s in states]
            torch._foreach_add_(step_tensors, 1.0)
            steps = [float(s) for s in step_tensors]
        lrs = self._step_sizes(group, steps)
        mode, wd, lr_peak = group["weight_decay_mode"], group["weight_decay"], group["lr_peak"]
        apply_decoupled_decay(work, [decay_rate(mode, wd, lr, lr_peak) for lr in lrs])
        self._update(group, work, grads, states, lrs)
        precision.write_back_(
            params, work, mode=precision.param_update_mode(group), states=[self.state[p] for p in params]
        )
