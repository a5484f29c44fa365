"""Turn a loaded recipe into the objects the Trainer needs: optimizer class + kwargs, decay groups, schedule.

Unstated fields (``null`` in the recipe, listed under ``unknown``) are *not* filled here: the optimizer class'
own default applies, and :func:`optimizer_cls_and_kwargs` logs which fields that concerns, so a run's log says
what came from the paper and what did not.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from hf_optim import _validation as v
from hf_optim import factory
from hf_optim.registry import get_spec

from ._recipe_fields import WEIGHT_DECAY_IS_LR_PEAK
from .schedules import make_multiplier, make_scheduler

log = logging.getLogger(__name__)


def size_settings(recipe: Mapping[str, Any], size: str | None = None) -> dict[str, Any]:
    """The recipe's settings for one model size (``sizes.<size>`` over ``training``/``schedule``/``optimizer``)."""
    sizes = recipe.get("sizes") or {}
    if size is None:
        size = (recipe.get("run") or {}).get("size")
    if size is None and sizes:
        size = next(iter(sizes))  # the smallest size is listed first in every bundled recipe
    if size is not None and size not in sizes:
        from hf_optim._validation import closest

        raise ValueError(f"size {size!r} is not in this recipe's sizes {list(sizes)}.{closest(str(size), sizes)}")
    entry = dict(sizes.get(size, {})) if size is not None else {}
    training = recipe.get("training") or {}
    schedule = recipe.get("schedule") or {}
    return {
        "size": size,
        "lr": entry.get("lr", (recipe.get("optimizer") or {}).get("lr")),
        "batch_tokens": entry.get("batch_tokens", training.get("batch_tokens")),
        "total_tokens": entry.get("total_tokens", training.get("total_tokens")),
        "seq_len": entry.get("seq_len", training.get("seq_len")),
        "warmup_steps": entry.get("warmup_steps", schedule.get("warmup_steps")),
        "decay_steps": entry.get("decay_steps", schedule.get("decay_steps")),
        "floor": entry.get("floor", schedule.get("floor")),
    }


def weight_decay(recipe: Mapping[str, Any], size: str | None = None) -> float | None:
    """``optimizer.weight_decay`` as a number; ``lr_peak`` resolves to the chosen size's peak lr.

    PaLM's decay ``lr_t²`` is mode ``corrected`` with λ = lr_peak: resolving here (not when the YAML is written)
    keeps it ``lr_t²`` when ``optimizer.lr`` is overridden.
    """
    wd = (recipe.get("optimizer") or {}).get("weight_decay")
    if wd != WEIGHT_DECAY_IS_LR_PEAK:
        return wd
    lr = size_settings(recipe, size)["lr"]
    if lr is None:
        raise ValueError(
            f"optimizer.weight_decay={WEIGHT_DECAY_IS_LR_PEAK!r} means lambda = the peak lr, but recipe "
            f"{recipe.get('name')!r} states no lr for size {size!r}."
        )
    return float(lr)


def _tokens_to_steps(tokens: float, batch_tokens: float | None, what: str) -> int:
    if not batch_tokens:
        raise ValueError(
            f"schedule.{what} is given in tokens but the recipe has no batch_tokens to convert it to steps."
        )
    return round(tokens / batch_tokens)


def published_num_steps(recipe: Mapping[str, Any], size: str | None = None) -> int | None:
    """Training steps of the published run: ``training.total_steps`` or total tokens / batch tokens."""
    s = size_settings(recipe, size)
    total_steps = (recipe.get("training") or {}).get("total_steps")
    if total_steps:
        return int(total_steps)
    if s["total_tokens"] and s["batch_tokens"]:
        return round(s["total_tokens"] / s["batch_tokens"])
    return None


def schedule_kwargs(
    recipe: Mapping[str, Any], num_training_steps: int | None = None, size: str | None = None
) -> tuple[str, dict[str, Any]]:
    """``(name, kwargs)`` for :func:`hf_optim.runner.schedules.make_multiplier`, token counts converted to steps."""
    sched = dict(recipe.get("schedule") or {})
    s = size_settings(recipe, size)
    total = num_training_steps if num_training_steps is not None else published_num_steps(recipe, size)
    if total is None:
        raise ValueError(
            "num_training_steps is needed: the recipe states neither training.total_steps nor "
            "total_tokens and batch_tokens."
        )
    name = sched.get("name")
    if name is None:
        raise ValueError(
            "schedule.name is not set; choose one of the schedules in hf_optim.runner.schedules.SCHEDULES."
        )
    if s["warmup_steps"] is not None:
        warmup = int(s["warmup_steps"])
    elif sched.get("warmup_tokens") is not None:
        warmup = _tokens_to_steps(sched["warmup_tokens"], s["batch_tokens"], "warmup_tokens")
    elif sched.get("warmup_fraction") is not None:
        # [0, 1): a fraction of 1 or more would leave no step after the warm-up, so the peak lr is never reached.
        v.check_unit_interval("schedule.warmup_fraction", sched["warmup_fraction"])
        warmup = round(sched["warmup_fraction"] * total)
    else:
        warmup = 0
    kwargs: dict[str, Any] = {"num_training_steps": int(total), "num_warmup_steps": warmup}
    if name in ("cosine_to_floor", "linear_to_floor"):
        if s["decay_steps"] is not None:
            kwargs["decay_steps"] = int(s["decay_steps"])
        elif sched.get("decay_tokens") is not None:
            kwargs["decay_steps"] = _tokens_to_steps(sched["decay_tokens"], s["batch_tokens"], "decay_tokens")
        if s["floor"] is not None:
            kwargs["floor"] = s["floor"]
    for key in ("plateau_steps", "milestones", "factors", "phases"):
        if sched.get(key) is not None:
            kwargs[key] = sched[key]
    return name, kwargs


def multiplier(recipe: Mapping[str, Any], num_training_steps: int | None = None, size: str | None = None):
    name, kwargs = schedule_kwargs(recipe, num_training_steps, size)
    return make_multiplier(name, **kwargs)


def decay_parameter_names(model: nn.Module, no_decay: list[str] | None) -> list[str]:
    """Names of the parameters that get weight decay; ``no_decay=None`` means the Trainer's default."""
    return factory.decay_parameter_names(model, no_decay)


def optimizer_cls_and_kwargs(
    recipe: Mapping[str, Any], model: nn.Module | None = None, *, size: str | None = None
) -> tuple[type, dict[str, Any]]:
    """The optimizer class and its keyword arguments (muP overrides included), from :func:`hf_optim.factory.
    resolve_optimizer`: the recipe only says what is stated; the factory decides the rest."""
    opt = dict(recipe.get("optimizer") or {})
    if opt.get("name") is None:
        raise ValueError("optimizer.name is not set; choose a registered optimizer (hf-optim list).")
    spec = get_spec(opt["name"])
    lr = size_settings(recipe, size)["lr"]
    knobs: dict[str, Any] = dict(opt.get("args") or {})
    takes = {"betas": spec.takes_betas, "eps": spec.takes_eps, "eps_mode": spec.takes_eps}
    not_stated = []
    for key in ("betas", "eps", "eps_mode", "weight_decay_mode"):
        value = opt.get(key)
        if value is None:
            not_stated.append(key)
            continue
        if not takes.get(key, True):
            raise ValueError(
                f"optimizer.{key}={value!r} is stated, but {opt['name']} has no {key} (its moments are "
                f"knobs in optimizer.args; hf-optim list). Set optimizer.{key}=null."
            )
        value = tuple(value) if key == "betas" else value
        if key in knobs and _as_given(knobs[key]) != value:
            # Two doors to one knob: neither may silently win.
            raise ValueError(
                f"optimizer.{key}={value!r} and optimizer.args.{key}={knobs[key]!r} disagree; state {key} once "
                f"(optimizer.{key} is the recipe's field for it)."
            )
        knobs[key] = value
    wd = weight_decay(recipe, size)
    not_stated += [key for key, value in (("lr", lr), ("weight_decay", wd)) if value is None]
    # Only what the optimizer has: Adafactor / SGD state their moments in optimizer.args.
    not_stated = [k for k in not_stated if takes.get(k, True) and k != "eps_mode"]
    if not_stated:
        log.warning(
            "Recipe %s does not state %s: %s's defaults apply.", recipe.get("name"), ", ".join(not_stated), spec.target
        )
    if lr is None:
        raise ValueError(f"recipe {recipe.get('name')!r} states no lr: set optimizer.lr.")
    wd_rule = ((recipe.get("model") or {}).get("mup") or {}).get("wd_rule")
    return factory.resolve_optimizer(
        opt["name"],
        model,
        lr=lr,
        weight_decay=wd if wd is not None else 0.0,
        knobs=knobs,
        mup_wd_rule=wd_rule,
        groups=opt.get("groups"),
        layer_decay=opt.get("layer_decay"),
    )


def _as_given(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def build_optimizer(recipe: Mapping[str, Any], model: nn.Module, *, size: str | None = None) -> torch.optim.Optimizer:
    """The optimizer as the Trainer builds it: a decay group and a no-decay group (weight_decay 0)."""
    cls, kwargs = optimizer_cls_and_kwargs(recipe, model, size=size)
    no_decay = (recipe.get("optimizer") or {}).get("no_decay")
    return cls(factory.param_groups(model, kwargs.get("weight_decay", 0.0), no_decay), **kwargs)


def dry_build(recipe: Mapping[str, Any], *, size: str | None = None) -> torch.optim.Optimizer:
    """The recipe's optimizer built on a stand-in parameter, so that every value passes the class's own checks
    before any model or data exists (a ``ValueError``/``TypeError`` naming the value otherwise).

    muP multipliers need the model and are applied when the real optimizer is built; everything else is the same.
    """
    from hf_optim.param_rules import check_layer_decay, parse_rules

    opt = recipe.get("optimizer") or {}
    parse_rules(opt.get("groups"), "optimizer.groups")  # their names are matched once the model exists
    check_layer_decay(opt.get("layer_decay"))
    recipe = {**recipe, "optimizer": {k: v for k, v in opt.items() if k not in ("groups", "layer_decay")}}
    cls, kwargs = optimizer_cls_and_kwargs(recipe, None, size=size)
    kwargs = {k: v for k, v in kwargs.items() if k != "param_overrides"}
    stand_in = nn.Parameter(torch.zeros(2, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # magnitude warnings come again, once, when the real optimizer is built
        return cls([{"params": [stand_in], "weight_decay": kwargs.get("weight_decay", 0.0)}], **kwargs)


def check_resume_family(recipe: Mapping[str, Any], checkpoint: str, *, size: str | None = None) -> None:
    """``ValueError`` when the optimizer state in ``checkpoint`` belongs to another optimizer family than the
    recipe's (e.g. Adafactor state resumed by an AdamW recipe), checked before the model is built.

    Only the parameter groups' knobs are read; shapes are checked against the model when the Trainer loads it.
    """
    import os

    path = os.path.join(checkpoint, "optimizer.pt")
    if not os.path.isfile(path):  # a sharded (FSDP / DeepSpeed) checkpoint: checked when the Trainer loads it
        return
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # any unreadable file is the user's to fix, named here
        raise ValueError(
            f"--resume {checkpoint}: optimizer.pt cannot be read ({type(error).__name__}: {error})."
        ) from None
    opt = dry_build(recipe, size=size)
    if not hasattr(type(opt), "interop_formats"):
        return
    from hf_optim._state_loading import check_family

    try:
        check_family(opt, state)
    except ValueError as error:
        name = (recipe.get("optimizer") or {}).get("name")
        raise ValueError(f"--resume {checkpoint} cannot continue with optimizer {name!r}: {error}") from None


def unstated_schedule_fields(recipe: Mapping[str, Any], size: str | None = None) -> list[str]:
    """Schedule fields the recipe leaves open for this size, so that the schedule's defaults (no warm-up, floor 0)
    apply; e.g. LLaMA-3 8B, whose paper gives only the peak lr."""
    s = size_settings(recipe, size)
    sched = recipe.get("schedule") or {}
    missing = []
    if s["warmup_steps"] is None and all(sched.get(k) is None for k in ("warmup_tokens", "warmup_fraction")):
        missing.append("warm-up (0 steps used)")
    if sched.get("name") in ("cosine_to_floor", "linear_to_floor") and s["floor"] is None:
        missing.append("floor (0 used)")
    return missing


def build_scheduler(
    recipe: Mapping[str, Any],
    optimizer: torch.optim.Optimizer,
    num_training_steps: int | None = None,
    *,
    size: str | None = None,
):
    """The recipe's lr schedule as a ``LambdaLR``; logs which schedule fields the recipe does not state."""
    missing = unstated_schedule_fields(recipe, size)
    if missing:
        log.warning("Recipe %s does not state the schedule's %s.", recipe.get("name"), " or ".join(missing))
    name, kwargs = schedule_kwargs(recipe, num_training_steps, size)
    return make_scheduler(optimizer, name, **kwargs)


def is_factored_adafactor(cls: type, kwargs: Mapping[str, Any]) -> bool:
    from hf_optim.optim.adafactor.optimizer import Adafactor
    from hf_optim.optim.adafactor.presets import PRESETS

    if not (isinstance(cls, type) and issubclass(cls, Adafactor)):
        return False

    preset = PRESETS.get(kwargs.get("preset", "adafactor_v2"), {})
    return bool(kwargs.get("factored", preset.get("factored", True)))


def check_deepspeed(cls: type, kwargs: dict[str, Any], *, deepspeed: bool, fallback: bool) -> dict[str, Any]:
    """Factored Adafactor cannot run under DeepSpeed ZeRO: the optimizer only sees flat 1-D partitions.

    Raise a clear error, or (``fallback=True``, i.e. ``run.unfactored_fallback: true``) switch to the unfactored
    second moment (exact Adam-like statistics, O(n·m) memory) with a warning.
    """
    if not deepspeed or not is_factored_adafactor(cls, kwargs):
        return kwargs
    if not fallback:
        raise ValueError(
            "Factored Adafactor cannot run under DeepSpeed ZeRO: ZeRO hands the optimizer flat 1-D partitions, so "
            "the row/column statistics of each matrix do not exist. Use FSDP2 (recipes/accelerate/fsdp2.yaml), "
            "pass optimizer.args.factored=false (unfactored, like PaLM), or run.unfactored_fallback=true to switch "
            "to it automatically with a warning."
        )
    warnings.warn(
        "DeepSpeed ZeRO: Adafactor falls back to an unfactored second moment (factored=False); its "
        "state now has one value per parameter, as Adam's exp_avg_sq.",
        UserWarning,
        stacklevel=2,
    )
    return {**kwargs, "factored": False}
