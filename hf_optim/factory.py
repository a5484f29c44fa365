r"""The one door: ``name + model (or params) + settings → optimizer``, for every entry point.

:func:`create_optimizer` is what a plain PyTorch loop calls; the Trainer plugin
(:mod:`hf_optim.integrations.transformers.trainer`), ``hf-optim train`` and ``hf-optim sweep`` call it too, or its
lower half :func:`resolve_optimizer` where the Trainer builds the parameter groups itself. Nothing else decides knob
defaults, presets, the decay / no-decay split, muP multipliers or the checks between them, so the same settings give
the same optimizer whichever door they enter by.

What happens, in order (in the spirit of timm's ``create_optimizer_v2`` and nanoGPT's ``configure_optimizers``):

1. the registry spec gives the class, its fixed defaults (e.g. a preset) and its capabilities;
2. knobs: ``spec.defaults`` < ``fallback_knobs`` (values mapped from elsewhere, e.g. ``--adam_beta1``, used only
   where the class takes them) < the caller's ``knobs`` and ``optim_args`` (typed and checked: an unknown key is a
   ``ValueError`` naming the closest valid one; one key given twice with two values is an error);
3. muP: if the model carries a plan (``mup=None``) or ``mup=True``, the one muP policy
   (:func:`mup_integration.policy.mup_settings`, imported only here and only then) checks the settings and
   returns per-parameter multipliers, passed as ``param_overrides``, and the plan's kinds for a spec's router;
4. groups (:func:`create_optimizer` only): decay / no-decay by parameter name, the Trainer's split by default.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from . import param_rules
from ._optim_args import HANDLER_KEYS, MUP_WD_RULES, parse_optim_args, split_optim_args
from ._validation import check_choice, closest
from .registry import OptimizerSpec, get_spec

#: Name patterns of each no-decay category; ``"norm"`` is transformers' ``Trainer.get_decay_parameter_names``
#: (lower-cased full names), which also excludes every parameter inside an ``nn.LayerNorm``.
NO_DECAY_PATTERNS: dict[str, tuple[str, ...]] = {
    "bias": (r"bias",),
    "norm": (r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"),
    "embedding": (r"embed_tokens", r"(?:^|\.)wte\.", r"(?:^|\.)wpe\.", r"embeddings?\.", r"embed_in\."),
}
#: The Trainer's default: biases and norm weights get no weight decay.
TRAINER_NO_DECAY: tuple[str, ...] = ("bias", "norm")

NoDecay = Sequence[str] | Callable[[str, torch.Tensor], bool] | None


def no_decay_predicate(model: nn.Module, no_decay: NoDecay = None) -> Callable[[str, torch.Tensor], bool]:
    """``(name, param) -> True`` for parameters that get no weight decay.

    ``no_decay`` is ``None`` (the Trainer's split: biases and norms), a list of categories from
    :data:`NO_DECAY_PATTERNS`, or a predicate of its own.
    """
    if callable(no_decay):
        return no_decay
    categories = TRAINER_NO_DECAY if no_decay is None else tuple(no_decay)
    if isinstance(no_decay, str):
        raise TypeError(f"no_decay must be a list of categories, got the string {no_decay!r}; e.g. no_decay=['bias'].")
    for category in categories:
        check_choice("no_decay", category, tuple(NO_DECAY_PATTERNS))
    patterns = [re.compile(p) for c in categories for p in NO_DECAY_PATTERNS[c]]
    in_layer_norm: set[str] = set()
    if "norm" in categories:
        for module_name, module in model.named_modules():
            if module_name and isinstance(module, nn.LayerNorm):
                in_layer_norm.update(f"{module_name}.{n}" for n, _ in module.named_parameters())

    def excluded(name: str, _param: torch.Tensor) -> bool:
        return name in in_layer_norm or any(p.search(name.lower()) for p in patterns)

    return excluded


def decay_parameter_names(model: nn.Module, no_decay: NoDecay = None) -> list[str]:
    """Names of the parameters that get weight decay (the Trainer's ``get_decay_parameter_names`` by default)."""
    excluded = no_decay_predicate(model, no_decay)
    return [n for n, p in model.named_parameters() if not excluded(n, p)]


def param_groups(
    model_or_params: nn.Module | Iterable[Any], weight_decay: float, no_decay: NoDecay = None
) -> list[dict[str, Any]]:
    """A decay group and a no-decay group (``weight_decay=0``) for a model; params or groups are passed through."""
    if not isinstance(model_or_params, nn.Module):
        if no_decay is not None:
            raise ValueError(
                "no_decay selects parameters by name, so it needs a model (nn.Module), not bare "
                "parameters; pass the model, or build the groups yourself."
            )
        if isinstance(model_or_params, torch.Tensor):
            raise TypeError(
                "model_or_params must be an nn.Module or an iterable of parameters / groups, got a "
                "single Tensor; wrap it in a list."
            )
        return list(model_or_params)
    excluded = no_decay_predicate(model_or_params, no_decay)
    named = [(n, p) for n, p in model_or_params.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if not excluded(n, p)], "weight_decay": weight_decay},
        {"params": [p for n, p in named if excluded(n, p)], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def _check_knobs(spec: OptimizerSpec, cls: type, knobs: Mapping[str, Any], valid: Mapping[str, Any]) -> None:
    """Keyword-argument knobs are Python values already (the class checks them); only their names are checked here."""
    for key in knobs:
        if key in ("lr", "weight_decay", "params", "param_overrides"):
            raise TypeError(f"{key!r} is an argument of its own, not a knob: pass {key}=... directly.")
        if key in HANDLER_KEYS:
            raise TypeError(f"{key!r} is an argument of its own ({key}=...), not a knob.")
        if key not in valid:
            names = sorted(valid)
            raise ValueError(
                f"Unknown knob {key!r} for {spec.name!r} ({cls.__name__}). Valid knobs: {names}.{closest(key, names)}"
            )


def _merge(knobs: dict[str, Any], optim_args: dict[str, Any]) -> dict[str, Any]:
    for key in knobs.keys() & optim_args.keys():
        if knobs[key] != optim_args[key]:
            raise ValueError(
                f"{key} is given twice with different values: {knobs[key]!r} as a keyword argument "
                f"and {optim_args[key]!r} in optim_args; give it once."
            )
    return {**knobs, **optim_args}


def _option(name: str, argument: Any, optim_args: Mapping[str, Any], parsed: Mapping[str, Any]) -> Any:
    """A handler option (``mup``, ``mup_wd_rule``) given as an argument or in ``optim_args`` (not both, differently)."""
    in_args = parsed[name] if name in optim_args else None
    if argument is not None and in_args is not None and argument != in_args:
        raise ValueError(
            f"{name}={argument!r} as an argument conflicts with optim_args {name}={in_args!r}; give it once."
        )
    if argument is not None:
        return argument
    return in_args if in_args is not None else HANDLER_KEYS[name]


def resolve_optimizer(
    name: str,
    model: nn.Module | None = None,
    *,
    lr: float,
    weight_decay: float = 0.0,
    optim_args: Mapping[str, Any] | str | None = None,
    knobs: Mapping[str, Any] | None = None,
    fallback_knobs: Mapping[str, Any] | None = None,
    mup: bool | None = None,
    mup_wd_rule: str | None = None,
    groups: Any = None,
    layer_decay: float | None = None,
    where: str | None = None,
) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """``(OptimizerClass, kwargs)``: everything of :func:`create_optimizer` except the parameter groups.

    ``fallback_knobs`` hold values mapped from another source (the Trainer's ``--adam_beta1/2``, ``--adam_epsilon``);
    they apply only where the spec takes them (``takes_betas`` / ``takes_eps``) and the caller did not set them.
    ``where`` names the entry point in muP error messages (the Trainer passes ``--optim NAME``).
    """
    spec = get_spec(name)
    cls = spec.resolve()
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        # The Trainer treats anything else as a factory and skips its decay / no-decay grouping.
        raise TypeError(f"OptimizerSpec {name!r}: target {spec.target} must be a torch.optim.Optimizer subclass.")
    where = where or f"optimizer {name!r}"
    knobs = dict(knobs or {})
    if isinstance(optim_args, str) or optim_args is None:
        optim_args = split_optim_args(optim_args)
    preset = optim_args.get("preset", knobs.get("preset", spec.defaults.get("preset")))
    preset = preset if isinstance(preset, str) else None
    class_knobs = spec.knobs(preset)  # read once per build: the checks, the fallbacks and the muP policy share it
    _check_knobs(spec, cls, knobs, class_knobs)
    from_args, options = parse_optim_args(optim_args, cls, optim_name=name, preset=preset)
    user = _merge(knobs, from_args)
    kwargs: dict[str, Any] = {**spec.defaults, "lr": lr, "weight_decay": weight_decay}
    for key, value in (fallback_knobs or {}).items():
        takes = {"betas": spec.takes_betas, "eps": spec.takes_eps}.get(key, key in class_knobs)
        if takes and key not in user:
            kwargs[key] = value
    kwargs.update(user)
    use_mup = _option("mup", mup, optim_args, options)
    wd_rule = _option("mup_wd_rule", mup_wd_rule, optim_args, options)
    check_choice("mup_wd_rule", wd_rule, MUP_WD_RULES)
    settings = _mup_settings(spec, cls, model, {**class_knobs, **kwargs}, set(user), use_mup, wd_rule, where)
    overrides = None if settings is None else settings.overrides
    # which update rule steps each parameter (Muon / fallback): by the plan's kinds when muP applies, else by
    # module type and shape; muP's multipliers apply on top
    routes = spec.routes(model, None if settings is None else settings.kinds) if model is not None else {}
    if routes:
        overrides = param_rules.merge(routes, overrides or {})
    rules = param_rules.parse_rules(_option("groups", groups, optim_args, options))
    decay = param_rules.check_layer_decay(_option("layer_decay", layer_decay, optim_args, options))
    if rules or decay is not None:
        if model is None:
            raise ValueError(
                "groups / layer_decay select parameters by name, so they need a model (nn.Module), not bare "
                "parameters; pass the model."
            )
        # muP first, the user's rules on top (param_rules: lr multipliers multiply, other values replace)
        overrides = param_rules.merge(overrides, param_rules.rule_overrides(model, rules, decay))
    if overrides is not None:
        kwargs["param_overrides"] = overrides
    spec.prepare_model(model, kwargs)
    return cls, kwargs


def _mup_settings(
    spec: OptimizerSpec,
    cls: type,
    model: nn.Module | None,
    knobs: dict[str, Any],
    explicit: set[str],
    use_mup: bool | None,
    wd_rule: str,
    where: str,
) -> Any:
    """The muP policy's settings for the resolved ``knobs`` (class defaults under the build's), or None."""
    if model is None and not use_mup:
        return None
    if model is None:
        raise ValueError(
            f"mup=True for {spec.name!r}, but no model was given: the muP multipliers come from the "
            "model's plan (model.config); pass the model, or drop mup=True."
        )
    if use_mup is False:
        return None
    from mup_integration.policy import mup_settings  # muP is entered here only, and only for a model

    return mup_settings(
        model, spec=spec, cls=cls, knobs=knobs, explicit=explicit, wd_rule=wd_rule, where=where, required=bool(use_mup)
    )


def create_optimizer(
    name: str,
    model_or_params: nn.Module | Iterable[Any],
    *,
    lr: float,
    weight_decay: float = 0.0,
    optim_args: Mapping[str, Any] | str | None = None,
    mup: bool | None = None,
    mup_wd_rule: str | None = None,
    no_decay: NoDecay = None,
    groups: Any = None,
    layer_decay: float | None = None,
    **knobs: Any,
) -> torch.optim.Optimizer:
    """Build the registered optimizer ``name`` for a model (or parameters), as every hf-optim entry point does.

    Args:
        name: a registered name (``hf-optim list``), e.g. ``"adamw_v2"``, ``"adafactor_v2"``.
        model_or_params: a model (groups by parameter name; muP plan read from its config) or parameters / groups
            (used as given: no decay split, no muP).
        lr: the peak learning rate (schedulers scale it; ``lr_peak`` follows).
        weight_decay: λ for the decay group; the no-decay group gets 0.
        optim_args: the ``--optim_args`` string (``"beta1=0.9,weight_decay_mode=independent"``) or a mapping.
        mup: ``None`` applies the model's muP plan if it has one; ``True`` requires one; ``False`` ignores it.
        mup_wd_rule: ``"independent"`` (default: per-step decay λ·η_t at every width), ``"mup"`` (mup 1.0.0's
            λ·width_mult with lr-coupled decay) or ``"none"``.
        groups: parameter-group rules (:mod:`hf_optim.param_rules`): a list of ``{match: REGEX, lr_mult, weight_decay,
            weight_decay_mode, optimizer, freeze}`` or the path of a YAML file of them; the first matching rule wins.
        layer_decay: lr x ``layer_decay^(L - layer id)`` for numbered blocks (:mod:`hf_optim.param_rules`).
        no_decay: ``None`` (the Trainer's split: biases and norms), categories from :data:`NO_DECAY_PATTERNS`, or a
            predicate ``(name, param) -> bool`` that is true for parameters without decay.
        **knobs: any knob of the class (``betas=(0.9, 0.95)``, ``preset="palm"``, ``weight_decay_mode=...``).

    Example::

        opt = hf_optim.create_optimizer("adafactor_v2", model, lr=1e-2, weight_decay=1e-4, optim_args="preset=palm")
    """
    model = model_or_params if isinstance(model_or_params, nn.Module) else None
    cls, kwargs = resolve_optimizer(
        name,
        model,
        lr=lr,
        weight_decay=weight_decay,
        optim_args=optim_args,
        knobs=knobs,
        mup=mup,
        mup_wd_rule=mup_wd_rule,
        groups=groups,
        layer_decay=layer_decay,
    )
    return cls(param_groups(model_or_params, weight_decay, no_decay), **kwargs)
