"""The central table of optimizer configurations.

Generic tests (invariants, state_dict round trip, bf16, bad hyperparameters, fast path == for-loop) run over every
row. Adding an optimizer or a mode = one row here. Each section belongs to one module of ``hf_optim``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import hf_optim


@dataclass(frozen=True)
class Case:
    id: str
    cls_name: str  # attribute of the hf_optim package
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def cls(self) -> type:
        return getattr(hf_optim, self.cls_name)

    @property
    def available(self) -> bool:
        """False while the row's module is not written yet (its tests then fail, as they should)."""
        try:
            self.cls
        except (ImportError, AttributeError):
            return False
        return True

    def build(self, params, **overrides: Any):
        return self.cls(params, **{**self.kwargs, **overrides})


CASES: list[Case] = [
    # --- hf_optim/adam.py -------------------------------------------------------------------------------------
    Case("adam-l2", "Adam", dict(lr=1e-2, weight_decay=1e-2, weight_decay_mode="l2")),
    Case("adamw-coupled", "AdamW", dict(lr=1e-2, weight_decay=1e-1)),
    Case("adamw-independent", "AdamW", dict(lr=1e-2, weight_decay=1e-4, weight_decay_mode="independent")),
    Case("adamw-corrected", "AdamW", dict(lr=1e-2, weight_decay=1e-2, weight_decay_mode="corrected")),
    Case("adamw-tf-eps", "AdamW", dict(lr=1e-2, weight_decay=1e-1, eps_mode="tf", eps=1e-7)),
    Case("adam-atan2", "AdamAtan2", dict(lr=1e-2, weight_decay=1e-1)),
    Case("radam-l2", "RAdam", dict(lr=1e-2, weight_decay=1e-2)),
    Case("radam-coupled", "RAdam", dict(lr=1e-2, weight_decay=1e-2, weight_decay_mode="coupled")),
    # --- hf_optim/sgd.py, adagrad.py, rmsprop.py --------------------------------------------------------------
    Case("sgdw-nesterov", "SGDW", dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    Case("sgdw-l2", "SGDW", dict(lr=1e-2, momentum=0.9, weight_decay=1e-2, weight_decay_mode="l2")),
    Case("sgdw-independent", "SGDW", dict(lr=1e-2, momentum=0.8, dampening=0.1, weight_decay=1e-4,
                                          weight_decay_mode="independent")),
    Case("adagrad", "AdaGrad", dict(lr=1e-2, weight_decay=1e-2)),
    Case("adagrad-coupled", "AdaGrad", dict(lr=1e-2, lr_decay=1e-2, initial_accumulator_value=0.1, weight_decay=1e-1,
                                            weight_decay_mode="coupled")),
    Case("rmsprop-centered", "RMSProp", dict(lr=1e-3, momentum=0.9, centered=True, weight_decay=1e-2)),
    Case("rmsprop-corrected", "RMSProp", dict(lr=1e-3, weight_decay=1e-3, weight_decay_mode="corrected")),
    # --- hf_optim/adafactor.py --------------------------------------------------------------------------------
    Case("adafactor-v2", "Adafactor", dict(lr=1e-2, preset="adafactor_v2")),
    Case("adafactor-hf", "Adafactor", dict(lr=1e-3, preset="hf")),
    Case("adafactor-torch", "Adafactor", dict(lr=1e-2, preset="torch")),
    Case("adafactor-palm", "Adafactor", dict(lr=1e-2, preset="palm")),
    Case("adafactor-t5", "Adafactor", dict(lr=1e-2, preset="t5")),
]

CASE_IDS = [case.id for case in CASES]
