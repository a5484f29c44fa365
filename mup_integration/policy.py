"""The one muP policy: a model's plan + an optimizer's resolved settings → per-parameter ``param_overrides``.

Called only by :func:`hf_optim.factory.resolve_optimizer` (so the Trainer plugin, ``hf-optim train``, ``hf-optim
sweep`` and a plain ``create_optimizer`` call get the same multipliers). It decides three things:

* whether the model can take the plan (its forward changes are in place; the class accepts ``param_overrides``);
* the learning-rate family, from the spec for the *resolved* knobs (``OptimizerSpec.mup_rule``: Adafactor with
  ``scale_parameter`` is ``adam_param_scale``, hidden lr ÷ sqrt(width_mult));
* whether the weight-decay rule and the decay mode agree (see :data:`mup_integration.vocabulary.WD_RULES`).

The multipliers themselves are :func:`mup_integration.groups.param_overrides`.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from .groups import param_overrides
from .plan import get_plan, has_plan, unwrap
from .surgery import is_mup_applied


def look_through(model: nn.Module) -> nn.Module:
    """The model under any wrapper that hides its config (DDP ``module``, torch.compile ``_orig_mod``, or a user's
    own wrapper with either attribute)."""
    model = unwrap(model)
    while not hasattr(model, "config"):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            break
        model = unwrap(inner)
    return model


def _takes_param_overrides(cls: type) -> bool:
    params = inspect.signature(cls.__init__).parameters
    return "param_overrides" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def check_wd_rule(wd_rule: str, knobs: Mapping[str, Any], explicit: set[str]) -> None:
    """Refuse a decay mode that the muP weight-decay rule would silently change or break.

    Only when something decays (``weight_decay > 0``): with λ = 0 every rule is the same optimizer.
    """
    if not knobs.get("weight_decay"):
        return
    mode = knobs.get("weight_decay_mode")
    if wd_rule == "independent" and "weight_decay_mode" in explicit and mode != "independent":
        raise ValueError(
            f"weight_decay_mode={mode!r} conflicts with mup_wd_rule='independent' (the default under muP), which "
            "switches every decayed muP group to weight_decay_mode='independent' (per-step decay lambda*eta_t at "
            "every width). Drop weight_decay_mode, or choose mup_wd_rule=mup (mup 1.0.0: weight_decay*width_mult "
            "with lr-coupled decay) or mup_wd_rule=none."
        )
    if wd_rule == "mup" and mode in ("independent", "corrected"):
        raise ValueError(
            "mup_wd_rule='mup' multiplies a hidden matrix's weight decay by width_mult so that lr-coupled decay "
            f"(weight_decay_mode 'coupled' or 'l2') stays width-independent; with weight_decay_mode={mode!r} (set, "
            "or the default of this optimizer or preset) the decay would instead grow with width. Set "
            "weight_decay_mode=coupled, or use mup_wd_rule=independent."
        )


class MuPSettings(NamedTuple):
    """What the policy hands the factory: the ``param_overrides`` and, for a spec with a ``router``, each
    parameter's kind (:data:`mup_integration.vocabulary.KINDS`), both read from one parse of the plan."""

    overrides: dict[torch.Tensor, dict[str, Any]]
    kinds: dict[torch.Tensor, str]


def mup_settings(
    model: nn.Module,
    *,
    spec: Any,
    cls: type,
    knobs: Mapping[str, Any],
    explicit: set[str],
    wd_rule: str,
    where: str,
    required: bool = False,
) -> MuPSettings | None:
    """``param_overrides`` (and the kinds a router needs) for ``model``'s plan under optimizer ``spec`` with resolved
    ``knobs``; ``None`` when the model has no plan and ``required`` is false.

    ``explicit`` holds the knob names the user set (a default may be overridden by the muP rule, an explicit
    choice may not). ``where`` names the entry point in errors (e.g. ``--optim adamw_v2``).
    """
    inner = look_through(model)
    if not has_plan(inner):
        if not required:
            return None
        raise ValueError(
            f"mup=true for {where}, but the model carries no muP plan (model.config.hf_optim_mup is not set). Apply "
            "muP to the model first (mup_integration.make_mup_model / apply_mup), or drop mup=true."
        )
    if not _takes_param_overrides(cls):
        raise TypeError(
            f"The model carries a muP plan, but {where} ({cls.__module__}.{cls.__name__}) does not accept "
            "param_overrides, so its per-layer multipliers cannot be applied. Pass mup=false to train without them, "
            "or give the class a param_overrides argument (see hf_optim._base.apply_param_overrides)."
        )
    if not is_mup_applied(inner):
        raise ValueError(
            "The model carries a muP plan (model.config.hf_optim_mup) but not its forward changes (readout multiplier, "
            "attention scale): it was probably loaded with a plain from_pretrained. Load it with "
            "mup_integration.from_pretrained(cls, path) or call mup_integration.apply_mup(model, init=False) before "
            "training, or pass mup=false."
        )
    check_wd_rule(wd_rule, knobs, explicit)
    # Which tensors decay at all is the decay / no-decay split of the groups (biases and norms never), as under muP.
    family = spec.mup_rule(knobs)
    # With depth scaling, block parameters' epsilon becomes eps * m_L^-alpha (mup_integration.depth); an override
    # replaces the group value, so the policy hands over the resolved eps of optimizers that have one.
    eps = knobs.get("eps")
    eps = eps if family != "sgd" and isinstance(eps, (int, float)) and not isinstance(eps, bool) and eps > 0 else None
    plan = get_plan(inner)
    overrides = param_overrides(inner, family=family, wd_rule=wd_rule, eps=eps, plan=plan)
    kinds = {p: info.kind for _, p, info in plan.match(inner.named_parameters())} if spec.router is not None else {}
    return MuPSettings(overrides, kinds)
