"""A registry of small frozen specs: ``optim`` name → optimizer class, fixed defaults and a description.

The Trainer plugin turns every spec into an ``OptimizerNames`` member plus a handler; the benchmark and the tests
iterate over the same table. Adding an optimizer = one :class:`OptimizerSpec` here (or a call to
:func:`register_optimizer` from another package) and one row in ``tests/optimizer_cases.py``.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from ._validation import check_choice, closest

MuPFamily = Literal["adam", "sgd"]


@dataclass(frozen=True)
class OptimizerSpec:
    """One registered optimizer.

    Attributes:
        name: the ``optim`` name (``TrainingArguments(optim=name)``, ``--optim name``).
        target: ``"module:Class"`` of a ``torch.optim.Optimizer`` subclass, imported only when used.
        defaults: keyword arguments always passed to the class (e.g. a preset); ``optim_args`` may override them.
        description: one line for ``hf-optim list`` and the README.
        mup_family: which muP learning-rate rule applies: ``"adam"`` (scale-invariant updates: hidden lr ÷ width_mult)
            or ``"sgd"`` (as ``mup.MuSGD``).
        adam_args: map ``--adam_beta1/2`` and ``--adam_epsilon`` to ``betas`` / ``eps``.
    """

    name: str
    target: str
    description: str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    mup_family: MuPFamily = "adam"
    adam_args: bool = True

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9_]*", self.name):
            raise ValueError(f"name must be lower_snake_case (letters, digits, '_'), got {self.name!r}.")
        if ":" not in self.target:
            raise ValueError(f"target must look like 'package.module:ClassName', got {self.target!r}.")
        check_choice("mup_family", self.mup_family, ("adam", "sgd"))
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))

    def resolve(self) -> type:
        """Import and return the optimizer class."""
        module_name, _, attr = self.target.partition(":")
        return getattr(importlib.import_module(module_name), attr)


_REGISTRY: dict[str, OptimizerSpec] = {}


def register_optimizer(spec: OptimizerSpec, *, overwrite: bool = False) -> OptimizerSpec:
    """Add ``spec`` to the registry (and to the Trainer, if the plugin is active). Idempotent for an equal spec."""
    existing = _REGISTRY.get(spec.name)
    if existing is not None and existing != spec and not overwrite:
        raise ValueError(
            f"An optimizer named {spec.name!r} is already registered ({existing.target}). "
            "Pass overwrite=True to replace it, or choose another name."
        )
    _REGISTRY[spec.name] = spec
    # The Trainer side is optional: register there too if transformers is already wired up.
    import sys

    if "hf_optim.trainer" in sys.modules:
        sys.modules["hf_optim.trainer"].register_with_transformers(spec)
    return spec


def get_spec(name: str) -> OptimizerSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"Unknown optimizer {name!r}. Registered: {sorted(_REGISTRY)}.{closest(name, _REGISTRY)}"
        ) from None


def list_optimizers() -> list[OptimizerSpec]:
    return list(_REGISTRY.values())


for _spec in (
    OptimizerSpec(
        "adamw_v2", "hf_optim.adam:AdamW",
        "AdamW with explicit weight_decay_mode (default 'coupled' = torch.optim.AdamW) and eps_mode (torch/tf).",
    ),
    OptimizerSpec(
        "adam_v2", "hf_optim.adam:Adam",
        "Adam with explicit weight_decay_mode (default 'l2' = torch.optim.Adam) and eps_mode (torch/tf).",
    ),
    OptimizerSpec(
        "adam_atan2", "hf_optim.adam:AdamAtan2",
        "Adam-atan2 (Everett et al. 2024): atan2(m̂, sqrt(v̂)) replaces m̂/(sqrt(v̂)+eps); no epsilon.",
    ),
    OptimizerSpec(
        "radam_v2", "hf_optim.adam:RAdam",
        "RAdam (Liu et al. 2019): variance-rectified Adam, SGD-with-momentum steps while rho_t <= 5.",
    ),
    OptimizerSpec(
        "adafactor_v2", "hf_optim.adafactor:Adafactor",
        "Adafactor with every component a knob; preset 'adafactor_v2' (also hf, torch, palm, t5).",
        defaults={"preset": "adafactor_v2"},
    ),
    OptimizerSpec(
        "sgdw_v2", "hf_optim.sgd:SGDW",
        "SGD with momentum/Nesterov and explicit weight_decay_mode (default 'coupled').",
        mup_family="sgd", adam_args=False,
    ),
    OptimizerSpec(
        "adagrad_v2", "hf_optim.adagrad:AdaGrad",
        "AdaGrad with explicit weight_decay_mode (default 'l2' = torch.optim.Adagrad).",
        adam_args=False,
    ),
    OptimizerSpec(
        "rmsprop_v2", "hf_optim.rmsprop:RMSProp",
        "RMSProp (centered, momentum) with explicit weight_decay_mode (default 'l2' = torch.optim.RMSprop).",
        adam_args=False,
    ),
):
    register_optimizer(_spec)
del _spec
