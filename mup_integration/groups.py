r"""The optimizer side of muP: the plan becomes plain per-parameter multipliers (``param_overrides``).

Every ``hf_optim`` optimizer takes ``param_overrides={param: {...}}`` (see ``docs/design.md``): ``lr_mult`` and
``weight_decay_mult`` multiply the group's value, any other key replaces it. With :math:`\alpha` the lr, :math:`\lambda`
the weight decay, :math:`m` the parameter's ``width_mult`` and :math:`r` = fan_in_mult / fan_out_mult:

==================  ===========================  ============================================================
rule                parameter kind               override
==================  ===========================  ============================================================
``family="adam"``   hidden                       ``lr_mult`` :math:`= 1/m`      (Adam, AdamW, Adafactor, AdaGrad,
                    embedding, readout, vector   none                           RMSProp: entry-wise normalised)
``"adam_param_scale"`` hidden                    ``lr_mult`` :math:`= 1/\sqrt m` (Adafactor with
                    embedding, readout, vector   none                           ``scale_parameter=True``)
``family="muon"``   hidden                       none (Muon with ``adjust`` original / spectral; ``rms``
                    embedding, readout, vector   none                           uses ``adam_param_scale``)
``family="sgd"``    hidden                       ``lr_mult`` :math:`= 1/r`      (= ``mup.MuSGD``)
                    embedding, readout, vector   ``lr_mult`` :math:`= m`
``wd="independent"`` decayed                     ``weight_decay_mode="independent"``: per-step decay
                                                 :math:`\eta_t\lambda` at every width and lr; in PyTorch (lr-coupled)
                                                 form, group ``weight_decay`` :math:`=\lambda m/\alpha` for a hidden
                                                 matrix whose lr is :math:`\alpha/m`
``wd="mup"``        hidden                       ``weight_decay_mult`` :math:`= m` (adam) / :math:`r` (sgd)
                    embedding, readout, vector   sgd only: ``weight_decay_mult`` :math:`= 1/m`  (= mup 1.0.0)
``wd="none"``       all                          ``weight_decay=0``
(any rule)          vector (biases, norms)       ``weight_decay=0`` unless ``decay_vectors=True``
==================  ===========================  ============================================================

``adam_param_scale``: Adafactor with parameter scaling multiplies each step by :math:`\max(\epsilon_2,
\mathrm{RMS}(W))`, and a muP hidden matrix has :math:`\mathrm{RMS}(W) \propto 1/\sqrt m` (initialised with variance
:math:`\sigma^2/m`, and its :math:`O(1/m)` updates keep it there), so :math:`1/\sqrt m` more gives the muP step
size :math:`\propto 1/m`; the other kinds have :math:`\mathrm{RMS}(W) = O(1)` and keep the Adam rule.

The ``mup`` rule is mup 1.0.0's: decay multiplied by the inverse of the lr multiplier, so that the *lr-coupled* decay
per step :math:`\alpha_t\,\lambda` does not change with width. It is meant for ``l2`` and ``coupled`` decay; with
``independent`` decay (not multiplied by the lr) it would make the decay grow with width: use ``wd="independent"``.

References: Yang et al., "Tensor Programs V" (2022), Table 3 and 8; microsoft/mup ``mup/optim.py`` (1.0.0).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn

from hf_optim import _validation as v
from hf_optim.decay import coupled_equivalent

from .depth import DepthRule, rule_for
from .plan import MuPPlan, ParamInfo, get_plan, unwrap
from .vocabulary import FAMILIES, WD_RULES


def override_for(
    info: ParamInfo,
    family: str,
    wd_rule: str,
    decay_vectors: bool,
    *,
    depth: DepthRule | None = None,
    eps: float | None = None,
) -> dict[str, Any]:
    """The override dict of one parameter (empty when nothing changes).

    ``depth``: the parameter's depth rule (:func:`mup_integration.depth.rule_for`; None outside the residual blocks
    or without depth scaling). ``eps``: the optimizer's epsilon, needed for the depth rule on Adam's epsilon (which
    replaces the group value); None leaves epsilon alone (optimizers without one: AdamAtan2, Adafactor, SGD).
    """
    out: dict[str, Any] = {}
    hidden = info.kind == "hidden"
    if family == "adam":
        width_lr = 1.0 / info.width_mult if hidden else 1.0
    elif family == "adam_param_scale":
        width_lr = 1.0 / math.sqrt(info.width_mult) if hidden else 1.0
    elif family == "muon":  # spectral norm of an orthogonalised update: width-independent (docs/mup.md)
        if depth is not None:
            raise ValueError(
                "CompleteP / depth-muP defines no depth rule for Muon's orthogonalised updates; train muon_v2 "
                "with width-only muP (no model.mup.depth_alpha / base_depth)."
            )
        width_lr = 1.0
    else:
        width_lr = 1.0 / info.fan_ratio if hidden else info.width_mult
    depth_lr = depth.lr_factor(family) if depth is not None else 1.0
    lr_mult = width_lr * depth_lr
    if lr_mult != 1.0:
        out["lr_mult"] = lr_mult
    if eps is not None and depth is not None and depth.eps_factor != 1.0:
        out["eps"] = eps * depth.eps_factor
    decayed = info.kind != "vector" or decay_vectors
    if wd_rule == "none" or not decayed:
        out["weight_decay"] = 0.0
    elif wd_rule == "independent":
        out["weight_decay_mode"] = "independent"
        if depth_lr != 1.0:  # the per-step decay follows the block's lr in depth, as the paper's lr-coupled decay
            out["weight_decay_mult"] = depth_lr
    else:  # "mup": the inverse of the *width* lr multiplier, as mup 1.0.0's MuAdam / MuSGD and CompleteP's λ·m_N
        if family != "sgd":
            wd_mult = 1.0 / width_lr
        else:
            wd_mult = info.fan_ratio if hidden else 1.0 / info.width_mult
        if wd_mult != 1.0:
            out["weight_decay_mult"] = wd_mult
    return out


def _check(family: str, wd_rule: str, decay_vectors: bool, eps: float | None = None) -> None:
    v.check_choice("family", family, FAMILIES)
    v.check_choice("wd_rule", wd_rule, WD_RULES)
    v.check_bool("decay_vectors", decay_vectors)
    v.check_positive("eps", eps, allow_none=True)
    if eps is not None and family == "sgd":
        raise ValueError(f"eps={eps!r} was given with family='sgd', whose optimizers have no epsilon; pass eps=None.")


def _named(model: nn.Module, plan: MuPPlan | None) -> list[tuple[str, torch.Tensor, ParamInfo, DepthRule | None]]:
    """``(name, parameter, info, depth rule)`` for every parameter of ``model``, matched to the plan."""
    if plan is None:
        plan = get_plan(model)
        from .surgery import is_mup_applied

        if not is_mup_applied(model):
            warnings.warn(
                "The model carries a muP plan but its forward changes (readout multiplier, attention scale) are not "
                "in place: was it loaded with a plain from_pretrained? Use mup_integration.from_pretrained(cls, path)"
                " or apply_mup(model, init=False) before training.",
                UserWarning,
                stacklevel=3,
            )
    return [
        (name, p, info, rule_for(plan.resolve(name), plan)) for name, p, info in plan.match(model.named_parameters())
    ]


def param_overrides(
    model: nn.Module,
    family: str = "adam",
    wd_rule: str = "independent",
    decay_vectors: bool = False,
    *,
    plan: MuPPlan | None = None,
    eps: float | None = None,
) -> dict[torch.Tensor, dict[str, Any]]:
    """``{Parameter: override}`` for every trainable parameter of ``model`` (wrapped or not), for ``param_overrides=``.

    ``plan`` defaults to the model's stored plan; a plan that does not match the model's parameters raises ValueError.
    ``eps``: the optimizer's epsilon; with depth scaling, block parameters get ``eps · m_L^-α``.
    """
    _check(family, wd_rule, decay_vectors, eps)
    return {
        p: override_for(info, family, wd_rule, decay_vectors, depth=rule, eps=eps)
        for _, p, info, rule in _named(model, plan)
        if p.requires_grad
    }


def mup_param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    family: str = "adam",
    wd_rule: str = "independent",
    decay_vectors: bool = False,
    *,
    plan: MuPPlan | None = None,
    eps: float | None = None,
) -> list[dict[str, Any]]:
    """Parameter groups for a plain ``torch.optim`` optimizer (lr-coupled decay, like ``torch.optim.AdamW``).

    Each group holds ``params``, ``lr`` and ``weight_decay`` already multiplied out; the ``independent`` rule becomes
    ``weight_decay = λ / lr_group`` (= :math:`\\lambda m/\\alpha` for a hidden matrix under the Adam rule), so the decay
    per step is ``lr_t · λ / lr_group = η_t λ`` as long as schedulers only scale ``lr``. Use with decoupled-decay
    optimizers (AdamW, SGD with ``weight_decay`` is L2 and does not follow this rule). With depth scaling and
    ``eps`` given, block parameters' groups also carry ``eps · m_L^-α``.
    """
    _check(family, wd_rule, decay_vectors, eps)
    v.check_positive("lr", lr)
    v.check_non_negative("weight_decay", weight_decay)
    buckets: dict[tuple[float, float, float | None], list[torch.Tensor]] = {}
    for _, p, info, rule in _named(model, plan):
        if not p.requires_grad:
            continue
        o = override_for(info, family, wd_rule, decay_vectors, depth=rule, eps=eps)
        group_lr = lr * o.get("lr_mult", 1.0)
        wd = o.get("weight_decay", weight_decay * o.get("weight_decay_mult", 1.0))
        if o.get("weight_decay_mode") == "independent":
            wd = coupled_equivalent("independent", wd, group_lr, group_lr)
        buckets.setdefault((group_lr, wd, o.get("eps", eps)), []).append(p)
    return [
        {"params": ps, "lr": group_lr, "weight_decay": wd, **({} if group_eps is None else {"eps": group_eps})}
        for (group_lr, wd, group_eps), ps in buckets.items()
    ]


def describe(model: nn.Module, family: str = "adam", wd_rule: str = "independent", decay_vectors: bool = False) -> str:
    """A table of the overrides per parameter name (for logs)."""
    _check(family, wd_rule, decay_vectors)
    plan = get_plan(unwrap(model))
    lines = [f"{'parameter':60s} {'kind':9s} {'width_mult':>10s}  override"]
    for name, _, info in plan.match(model.named_parameters()):
        rule = rule_for(plan.resolve(name), plan)
        lines.append(
            f"{name:60s} {info.kind:9s} {info.width_mult:10.4g}  "
            f"{override_for(info, family, wd_rule, decay_vectors, depth=rule)}"
        )
    return "\n".join(lines)
