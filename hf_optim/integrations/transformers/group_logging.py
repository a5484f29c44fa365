"""A Trainer callback that puts each parameter group's learning rate and weight decay into the logs.

The Trainer only logs ``learning_rate`` of group 0. With muP or per-group overrides the groups differ, and with
``independent``/``corrected`` decay the number that matters is the fraction of each weight removed per step, so for
every group ``i`` of an hf-optim optimizer this adds, on each training log:

* ``lr/group_i``: the group's current learning rate :math:`\\alpha_t`;
* ``wd/group_i``: the group's weight decay λ (after muP multipliers) as configured;
* ``decay/group_i``: the fraction of each weight removed this step by a decoupled mode
  (:func:`hf_optim.decay.decay_rate`: :math:`\\alpha_t\\lambda`, :math:`(\\alpha_t/\\alpha)\\lambda` or
  :math:`(\\alpha_t^2/\\alpha)\\lambda`); for ``l2`` decay (a gradient term) it is not logged.

The values are those of the step being logged, like the Trainer's own ``learning_rate`` (read after
``optimizer.step()`` and before ``lr_scheduler.step()``): the callback takes a snapshot in ``on_optimizer_step``
and writes it out in ``on_log``, so ``lr/group_0`` equals ``learning_rate`` for an un-multiplied group 0.

Registration adds the callback to ``transformers.trainer.DEFAULT_CALLBACKS`` so unmodified scripts get it; it does
nothing for optimizers that are not hf-optim's. Add it by hand with ``Trainer(callbacks=[GroupLoggingCallback()])``
when registration is not used.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from hf_optim._base import BaseOptimizer
from hf_optim.decay import DECOUPLED_MODES, decay_rate


def _unwrap(optimizer: Any) -> Any:
    # accelerate's AcceleratedOptimizer (and similar wrappers) keep the real optimizer in `.optimizer`.
    for _ in range(4):
        if optimizer is None or isinstance(optimizer, BaseOptimizer):
            break
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer if isinstance(optimizer, BaseOptimizer) else None


def group_log_values(optimizer: Any) -> dict[str, float]:
    """The ``lr/group_i``, ``wd/group_i``, ``decay/group_i`` values for an hf-optim optimizer ({} otherwise)."""
    optimizer = _unwrap(optimizer)
    if optimizer is None:
        return {}
    values: dict[str, float] = {}
    for index, group in enumerate(optimizer.param_groups):
        lr = float(group["lr"])
        weight_decay = float(group.get("weight_decay", 0.0))
        values[f"lr/group_{index}"] = lr
        values[f"wd/group_{index}"] = weight_decay
        mode = group.get("weight_decay_mode")
        if mode in DECOUPLED_MODES:
            values[f"decay/group_{index}"] = decay_rate(mode, weight_decay, lr, float(group.get("lr_peak", lr)))
    return values


class GroupLoggingCallback(TrainerCallback):
    """Adds per-group learning rate / weight decay to training logs (and to ``state.log_history``)."""

    def __init__(self) -> None:
        self._last_step: dict[str, float] = {}

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._last_step = {}

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # Called after optimizer.step() and before lr_scheduler.step(): the values this step actually used.
        self._last_step = group_log_values(kwargs.get("optimizer"))

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        # Only training logs carry `learning_rate`; evaluation and end-of-training summaries are left alone.
        if logs is None or "learning_rate" not in logs:
            return
        # Fallback (no optimizer step seen, e.g. a Trainer without on_optimizer_step): the current values.
        values = self._last_step or group_log_values(kwargs.get("optimizer"))
        if not values:
            return
        logs.update(values)
        # Trainer.log appended a copy of `logs` to log_history before calling us; keep trainer_state.json complete.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)
