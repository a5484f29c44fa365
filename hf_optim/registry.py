"""A registry of small frozen specs: ``optim`` name → optimizer class, fixed defaults and capabilities.

Everything a caller needs to know about an optimizer lives on its :class:`OptimizerSpec` (does it take ``betas`` /
``eps``, which muP learning-rate rule applies for its resolved knobs, its knob names and defaults), so that the one
factory (:func:`hf_optim.create_optimizer`), the Trainer plugin, the runner and the benchmark ask the spec instead of
keeping lists of names or inspecting signatures. Adding an optimizer = one :class:`OptimizerSpec` here (or a call to
:func:`register_optimizer` from another package) and one row in ``tests/optimizer_cases.py``.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from mup_integration.vocabulary import FAMILIES as MUP_FAMILIES

from ._validation import check_choice, closest

#: A name of :data:`mup_integration.vocabulary.FAMILIES` (checked when a spec is made).
MuPFamily = str


def adafactor_mup_family(knobs: Mapping[str, Any]) -> str:
    """Adafactor's muP rule: with parameter scaling each step already scales with RMS(W) ∝ 1/sqrt(width_mult), so
    the hidden lr is divided by sqrt(width_mult) only (see :mod:`mup_integration.groups`)."""
    return "adam_param_scale" if knobs.get("scale_parameter") else "adam"


def muon_mup_family(knobs: Mapping[str, Any]) -> str:
    """Muon's muP rule (docs/mup.md): an orthogonalised update of a hidden matrix has spectral norm ``s(A, B)·lr``;
    ``original`` / ``spectral`` scales do not grow with width (hidden lr unchanged, family ``"muon"``), ``rms``'s
    0.2·sqrt(max(A, B)) grows as sqrt(width), so its hidden lr is divided by sqrt(width_mult), Adafactor's rule."""
    return "adam_param_scale" if knobs.get("adjust") == "rms" else "muon"


@dataclass(frozen=True)
class OptimizerSpec:
    """One registered optimizer and what callers need to know about it.

    Attributes:
        name: the ``optim`` name (``TrainingArguments(optim=name)``, ``--optim name``).
        target: ``"module:Class"`` of a ``torch.optim.Optimizer`` subclass, imported only when used.
        description: one line for ``hf-optim list`` and the README.
        defaults: keyword arguments always passed to the class (e.g. a preset); ``optim_args`` may override them.
        mup_family: which muP learning-rate rule applies: ``"adam"`` (entry-wise normalised updates: hidden lr ÷
            width_mult), ``"adam_param_scale"`` (hidden lr ÷ sqrt(width_mult)) or ``"sgd"`` (as ``mup.MuSGD``); or a
            function of the resolved knobs returning one of them (Adafactor: it depends on ``scale_parameter``).
        takes_betas / takes_eps: the class has Adam's ``betas`` / ``eps`` arguments, so ``--adam_beta1/2`` and
            ``--adam_epsilon`` (and a recipe's ``betas`` / ``eps``) map onto them.
        adam_args: shorthand for ``takes_betas=takes_eps=adam_args`` (kept for specs written before the two flags).
        router: ``"module:function"`` called as ``router(model, kinds)``, giving each parameter's ``rule``
            override (which update rule of the optimizer steps it: Muon's ``muon`` / ``fallback``); ``kinds`` is
            ``{param: muP kind}`` of the model's plan when muP applies, else None. Applied by the factory before
            muP's multipliers and the user's rules (which may override it). None: one rule for every parameter.
        prepare: ``"module:function"`` called by the factory with ``(model, knobs)`` before the class is built, to
            connect what the optimizer needs from the model (Muon's ``qk_clip`` attention recorder). None: nothing.
    """

    name: str
    target: str
    description: str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    mup_family: MuPFamily | Callable[[Mapping[str, Any]], str] = "adam"
    adam_args: bool = True
    takes_betas: bool | None = None
    takes_eps: bool | None = None
    router: str | None = None
    prepare: str | None = None

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9_]*", self.name):
            raise ValueError(f"name must be lower_snake_case (letters, digits, '_'), got {self.name!r}.")
        if ":" not in self.target:
            raise ValueError(f"target must look like 'package.module:ClassName', got {self.target!r}.")
        if not callable(self.mup_family):
            check_choice("mup_family", self.mup_family, MUP_FAMILIES)
        for flag in ("takes_betas", "takes_eps"):
            if getattr(self, flag) is None:
                object.__setattr__(self, flag, bool(self.adam_args))
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))

    def resolve(self) -> type:
        """Import and return the optimizer class."""
        module_name, _, attr = self.target.partition(":")
        return getattr(importlib.import_module(module_name), attr)

    def routes(self, model: Any, kinds: Mapping[Any, str] | None = None) -> dict[Any, dict[str, Any]]:
        """``{param: {"rule": ...}}`` from :attr:`router` (empty without one); ``kinds``: the muP plan's."""
        if self.router is None:
            return {}
        module_name, _, attr = self.router.partition(":")
        return getattr(importlib.import_module(module_name), attr)(model, kinds)

    def prepare_model(self, model: Any, knobs: Mapping[str, Any]) -> None:
        """Run :attr:`prepare` (nothing without one)."""
        if self.prepare is not None:
            module_name, _, attr = self.prepare.partition(":")
            getattr(importlib.import_module(module_name), attr)(model, dict(knobs))

    def knobs(self, preset: str | None = None) -> dict[str, Any]:
        """Knob names → defaults (``inspect.Parameter.empty`` where none) of the class, for ``preset`` if it has
        presets (default: the spec's own preset)."""
        from ._optim_args import knob_defaults

        return knob_defaults(self.resolve(), preset if preset is not None else self.defaults.get("preset"))

    def mup_rule(self, knobs: Mapping[str, Any]) -> str:
        """The muP learning-rate rule for these resolved knobs (one of :data:`MUP_FAMILIES`)."""
        family = self.mup_family(knobs) if callable(self.mup_family) else self.mup_family
        check_choice(f"OptimizerSpec {self.name!r} mup_family", family, MUP_FAMILIES)
        return family


#: Called with each spec added after import (the Trainer plugin subscribes, so nothing here imports it).
_LISTENERS: list[Callable[[OptimizerSpec], None]] = []


def add_listener(callback: Callable[[OptimizerSpec], None]) -> None:
    """Call ``callback(spec)`` for every spec registered from now on (idempotent)."""
    if callback not in _LISTENERS:
        _LISTENERS.append(callback)


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
    for callback in _LISTENERS:
        callback(spec)
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
        "adamw_v2",
        "hf_optim.optim.adam.optimizers:AdamW",
        "AdamW with explicit weight_decay_mode (default 'coupled' = torch.optim.AdamW) and eps_mode (torch/tf).",
    ),
    OptimizerSpec(
        "adam_v2",
        "hf_optim.optim.adam.optimizers:Adam",
        "Adam with explicit weight_decay_mode (default 'l2' = torch.optim.Adam) and eps_mode (torch/tf).",
    ),
    OptimizerSpec(
        "adam_atan2",
        "hf_optim.optim.adam.optimizers:AdamAtan2",
        "Adam-atan2 (Everett et al. 2024): atan2(m̂, sqrt(v̂)) replaces m̂/(sqrt(v̂)+eps); no epsilon.",
        takes_eps=False,
    ),
    OptimizerSpec(
        "radam_v2",
        "hf_optim.optim.adam.optimizers:RAdam",
        "RAdam (Liu et al. 2019): variance-rectified Adam, SGD-with-momentum steps while rho_t <= 5.",
    ),
    OptimizerSpec(
        "adafactor_v2",
        "hf_optim.optim.adafactor.optimizer:Adafactor",
        "Adafactor with every component a knob; preset 'adafactor_v2' (also hf, torch, palm, t5).",
        defaults={"preset": "adafactor_v2"},
        mup_family=adafactor_mup_family,
        adam_args=False,
    ),
    OptimizerSpec(
        "sgdw_v2",
        "hf_optim.optim.sgd:SGDW",
        "SGD with momentum/Nesterov and explicit weight_decay_mode (default 'coupled').",
        mup_family="sgd",
        adam_args=False,
    ),
    OptimizerSpec(
        "adagrad_v2",
        "hf_optim.optim.adagrad:AdaGrad",
        "AdaGrad with explicit weight_decay_mode (default 'l2' = torch.optim.Adagrad).",
        adam_args=False,
    ),
    OptimizerSpec(
        "rmsprop_v2",
        "hf_optim.optim.rmsprop:RMSProp",
        "RMSProp (centered, momentum) with explicit weight_decay_mode (default 'l2' = torch.optim.RMSprop).",
        adam_args=False,
    ),
    OptimizerSpec(
        "muon_v2",
        "hf_optim.optim.muon.optimizer:Muon",
        "Muon (Newton-Schulz orthogonalised momentum) on hidden matrices + a fallback (AdamW) for the rest, one object.",
        mup_family=muon_mup_family,
        adam_args=False,
        router="hf_optim.optim.muon.optimizer:route",
        prepare="hf_optim.optim.muon.qk_clip:prepare",
    ),
):
    register_optimizer(_spec)
del _spec
