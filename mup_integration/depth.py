r"""Depth scaling on top of muP: CompleteP (:math:`\alpha = 1`) and depth-µP (:math:`\alpha = 1/2`).

With :math:`L` the number of transformer blocks, :math:`L_0` the base (tuned) depth, :math:`m_L = L/L_0` the depth
multiplier and :math:`\alpha \in [1/2, 1]`, the rules for a pre-LN transformer trained with AdamW are (Dey et al.,
"Don't be lazy: CompleteP enables compute-efficient deep transformers", arXiv 2505.01618, Table 1; reference code
EleutherAI/nanoGPT-mup branch ``completep``, ``model.py``):

=====================================  ===============================  =============================================
what                                   rule                             where it lives
=====================================  ===============================  =============================================
each attention / MLP branch output     :math:`\times\, m_L^{-\alpha}`   forward hook (:class:`BranchMultiplier`)
block parameters' lr (hidden weights,  :math:`\times\, m_L^{\alpha-1}`  ``lr_mult`` (on top of the width rule)
biases, pre-LN and QK-norm weights)
block parameters' Adam :math:`\epsilon` :math:`\epsilon\, m_L^{-\alpha}`  ``eps`` (replaces the group value)
block weights' decay                   lr-coupled :math:`\lambda m_N`:  ``weight_decay_mult`` (see below)
                                       no depth factor
hidden init, embedding, final norm,    unchanged                        (the width-only muP rules apply)
readout
=====================================  ===============================  =============================================

Derived here, not in the paper's table (see ``docs/mup.md``): with decay independent of the lr (this project's
default ``wd_rule="independent"``, per-step decay :math:`\eta_t\lambda`) the paper's per-step decay
:math:`\eta m_N^{-1} m_L^{\alpha-1}\cdot\lambda m_N = \eta\lambda\, m_L^{\alpha-1}` becomes ``weight_decay_mult``
:math:`= m_L^{\alpha-1}`; for SGD a block's update is proportional to its gradient, which carries one
:math:`m_L^{-\alpha}`, so keeping each block's contribution to the residual stream :math:`\propto 1/L` needs the lr
factor :math:`m_L^{2\alpha-1}` (depth-independent at :math:`\alpha=1/2`, as in Yang et al. 2023, "Tensor Programs
VI"). Every factor is exactly 1 at :math:`L = L_0`, so the base model and its optimizer groups are the width-only
muP ones.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from hf_optim import _validation as v

#: The published range of the branch exponent: 0.5 (depth-µP) .. 1.0 (CompleteP).
ALPHA_RANGE = (0.5, 1.0)
DEPTH_FIELDS = ("base_depth", "depth", "depth_alpha")


def num_layers(config: Any) -> int:
    """The number of transformer blocks of an HF config (GPT-2's ``n_layer`` is mapped to ``num_hidden_layers``)."""
    depth = getattr(config, "num_hidden_layers", None)
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(
            f"config of type {type(config).__name__} has no positive integer num_hidden_layers "
            f"(got {depth!r}); depth scaling needs one."
        )
    return depth


def check_depth_args(base_depth: Any, depth_alpha: Any) -> None:
    """Both or neither; ``base_depth`` a positive int, ``depth_alpha`` a real in [0.5, 1]."""
    if (base_depth is None) != (depth_alpha is None):
        raise ValueError(
            f"Pass both base_depth (the tuned model's number of layers) and depth_alpha (0.5 = depth-µP, "
            f"1.0 = CompleteP), or neither (width-only muP); got base_depth={base_depth!r}, "
            f"depth_alpha={depth_alpha!r}."
        )
    if base_depth is None:
        return
    if isinstance(base_depth, bool) or not isinstance(base_depth, int):
        raise TypeError(
            f"base_depth must be an int (a number of layers), got {base_depth!r} of type {type(base_depth).__name__}."
        )
    v.check_positive("base_depth", base_depth)
    v.check_number("depth_alpha", depth_alpha)
    if not ALPHA_RANGE[0] <= depth_alpha <= ALPHA_RANGE[1]:
        raise ValueError(
            f"depth_alpha must be in [{ALPHA_RANGE[0]}, {ALPHA_RANGE[1]}] (0.5 = depth-µP, 1.0 = "
            f"CompleteP), got {depth_alpha!r}."
        )


def depth_fields(config: Any, base_depth: int | None, depth_alpha: float | None) -> dict[str, Any]:
    """The plan's depth fields for ``config``: all None for width-only muP."""
    check_depth_args(base_depth, depth_alpha)
    if base_depth is None:
        return dict.fromkeys(DEPTH_FIELDS)
    return {"base_depth": base_depth, "depth": num_layers(config), "depth_alpha": float(depth_alpha)}


def at_target_depth(base_config: Any, config: Any, base_depth: int | None) -> Any:
    """``base_config`` with the target's number of layers (widths are compared layer by layer, by name)."""
    layers, base_layers = num_layers(config), num_layers(base_config)
    if base_layers == layers:
        return base_config
    if base_depth != base_layers:
        raise ValueError(
            f"base_config has num_hidden_layers={base_layers} but config has {layers}: to transfer across "
            f"depth pass base_depth={base_layers} and depth_alpha (0.5 = depth-µP, 1.0 = CompleteP); got "
            f"base_depth={base_depth!r}."
        )
    base_config = copy.deepcopy(base_config)
    base_config.num_hidden_layers = layers
    return base_config


def read_depth_fields(d: Mapping[str, Any]) -> dict[str, Any]:
    """The depth fields of a stored plan dict (absent = None = width-only), validated."""
    base_depth, depth, alpha = (d.get(name) for name in DEPTH_FIELDS)
    check_depth_args(base_depth, alpha)
    if (depth is None) != (base_depth is None):
        raise ValueError(f"The muP plan has base_depth={base_depth!r} but depth={depth!r}: both or neither.")
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int) or depth < 1):
        raise ValueError(f"The muP plan's depth must be a positive int, got {depth!r}.")
    return {"base_depth": base_depth, "depth": depth, "depth_alpha": None if alpha is None else float(alpha)}


def block_index(name: str) -> int | None:
    """The block a parameter belongs to: the first all-digit component of its name (``model.layers.3.…`` -> 3).

    In the supported causal LMs the only ``ModuleList`` indexed this way is the list of transformer blocks, so a
    name without one (embeddings, final norm, readout) lies outside every residual branch.
    """
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None


@dataclass(frozen=True)
class DepthRule:
    r"""The depth factors of one block parameter: :math:`m_L = L/L_0` and :math:`\alpha`."""

    mult: float
    alpha: float

    def lr_factor(self, family: str) -> float:
        r""":math:`m_L^{\alpha-1}` for entry-wise normalised updates (Adam family, Adafactor), :math:`m_L^{2\alpha-1}`
        for SGD."""
        exponent = 2 * self.alpha - 1 if family == "sgd" else self.alpha - 1
        return self.mult**exponent

    @property
    def eps_factor(self) -> float:
        r""":math:`m_L^{-\alpha}`: a block's gradients carry the branch multiplier, so Adam's :math:`\epsilon` follows."""
        return self.mult**-self.alpha


def rule_for(name: str, plan: Any) -> DepthRule | None:
    """The depth rule of parameter ``name`` (a plan key) under ``plan``; None outside blocks or without depth scaling."""
    if plan is None or plan.depth_alpha is None or block_index(name) is None:
        return None
    return DepthRule(plan.depth / plan.base_depth, plan.depth_alpha)


# ---- surgery: the residual-branch multiplier -------------------------------------------------------------------
class BranchMultiplier:
    """Forward hook multiplying a residual branch's output by a constant (picklable, deep-copyable)."""

    def __init__(self, multiplier: float) -> None:
        self.multiplier = float(multiplier)

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        return output * self.multiplier

    def __repr__(self) -> str:
        return f"BranchMultiplier({self.multiplier})"


def branch_output_modules(model: nn.Module, adapter: Any) -> list[nn.Module]:
    """The attention- and MLP-branch output modules of every block, in order (the adapter's ``branch_outputs``:
    LLaMA family ``o_proj`` / ``down_proj``, GPT-2 ``c_proj`` of attention and MLP, OLMo-2 its post-branch norms,
    where a multiplier on ``o_proj`` would be divided out again by the norm)."""
    return [module for pair in adapter.branch_outputs(model) for module in pair]


def at_base_depth(config: Any, plan: Any) -> Any:
    """``config`` with the plan's base depth (for SP init stds that depend on the depth, like GPT-2's ``c_proj``);
    ``config`` itself without depth scaling or at the base depth."""
    if plan.base_depth is None or plan.base_depth == num_layers(config):
        return config
    config = copy.deepcopy(config)
    config.num_hidden_layers = plan.base_depth
    return config


def apply_branch_multipliers(model: nn.Module, adapter: Any, plan: Any) -> None:
    """Set (replacing any earlier one) the :math:`m_L^{-\\alpha}` hook on every branch output; none when it is 1."""
    config = model.config
    modules = branch_output_modules(model, adapter)
    if plan.depth is not None and (plan.depth != num_layers(config) or len(modules) != 2 * plan.depth):
        raise ValueError(
            f"The plan is for {plan.depth} layers but the model has num_hidden_layers="
            f"{num_layers(config)} ({len(modules) // 2} blocks found); rebuild the plan for this config."
        )
    multiplier = plan.residual_multiplier
    for module in modules:
        for key, hook in list(module._forward_hooks.items()):
            if isinstance(hook, BranchMultiplier):
                del module._forward_hooks[key]
        if multiplier != 1.0:
            module.register_forward_hook(BranchMultiplier(multiplier))


def branch_multipliers_ok(model: nn.Module, adapter: Any, plan: Any) -> bool:
    """Whether every branch output carries exactly the plan's multiplier (no hook when it is 1)."""
    expected = plan.residual_multiplier
    modules = branch_output_modules(model, adapter)
    for module in modules:
        hooks = [h for h in module._forward_hooks.values() if isinstance(h, BranchMultiplier)]
        if expected == 1.0 and hooks:
            return False
        if expected != 1.0 and (len(hooks) != 1 or not math.isclose(hooks[0].multiplier, expected, rel_tol=1e-12)):
            return False
    return True
