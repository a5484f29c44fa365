"""What ``hf-optim mutransfer`` will train, decided and checked before any training: the target, the proxy, the
stages of the search, their cost in FLOPs and the budget.

The proxy is the target recipe with the width (and, under CompleteP, the depth) scaled down the way muP's base model
is derived from it (:func:`mup_integration._base_config.derive_base_config`): same number of heads and the MLP
width scaled with the hidden size, so at ``proxy width = model.mup.base_width`` the proxy *is* the base model and every
muP multiplier is 1. Cost is counted as ``6 N D`` FLOPs (Kaplan et al. 2020: forward + backward per parameter and
token; N = every parameter, D = tokens trained), the measured step-seconds are reported beside it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mup_integration.vocabulary import TRANSFERABLE_WD_RULES

from . import schema
from ._train_model import MODEL_DEFAULTS

#: The search, stage by stage (coordinate descent, each stage around the best point so far):
#: ``lr`` a coarse grid of ×2 steps, ``lr_fine`` (with ``--lr-resolution 0.5`` only) the two half-steps beside its
#: best, then the muP multipliers that matter for transfer (Tensor Programs V §7: output and attention logits), weight
#: decay when the recipe decays under a width-transferable rule, and a last look at the lr steps beside the best
#: (±resolution) with everything else tuned.
MULTIPLIER_FACTORS = {"output_mult": (0.25, 0.5, 2.0, 4.0), "attn_mult": (0.5, 2.0, 4.0)}
WD_FACTORS = (0.25, 0.5, 2.0, 4.0)
#: ×2 is the default resolution: the half-step the proxy preferred was worse at the target than both its ×2
#: neighbours in every seed of the committed example (docs/experiments/mutransfer), so finer steps are not transferred.
LR_RESOLUTIONS = (1.0, 0.5)
#: Weight-decay rules under which the proxy's best λ is the target's (mup_integration.groups, docs/mup.md).


@dataclass(frozen=True)
class Shape:
    """The model sizes a trial overrides in the recipe."""

    width: int
    layers: int
    heads: int
    intermediate: int | None

    def overrides(self) -> list[str]:
        out = [f"model.hidden_size={self.width}", f"model.num_layers={self.layers}", f"model.num_heads={self.heads}"]
        if self.intermediate is not None:
            out.append(f"model.intermediate_size={self.intermediate}")
        return out


@dataclass(frozen=True)
class Target:
    """The recipe to transfer to, read once (``schema.load``: base chain merged, validated)."""

    ref: str
    recipe: dict[str, Any]
    shape: Shape
    arch: str
    lr: float
    weight_decay: float
    mup: dict[str, Any] = field(default_factory=dict)
    vocab_size: int = 0
    tokens_per_step: int = 0
    steps: int = 0

    @property
    def base_width(self) -> int:
        return int(self.mup["base_width"])

    @property
    def has_depth_scaling(self) -> bool:
        return self.mup.get("base_depth") is not None and self.mup.get("depth_alpha") is not None

    @property
    def tunes_weight_decay(self) -> bool:
        return self.weight_decay > 0 and self.mup.get("wd_rule") in TRANSFERABLE_WD_RULES


def load_target(ref: str) -> Target:
    """Read the target recipe and refuse what mutransfer cannot transfer, with what to do instead."""
    from .data import read_text, tokenize

    recipe = schema.load(ref)
    model = {**MODEL_DEFAULTS, **{k: v for k, v in (recipe.get("model") or {}).items() if v is not None}}
    mup = model.get("mup") or {}
    if not mup.get("base_width"):
        raise ValueError(
            f"recipe {ref!r} has no model.mup.base_width: mutransfer transfers hyperparameters under muP only (under "
            "the standard parametrization the best lr moves with width). Add e.g. model.mup: {base_width: 64, "
            "wd_rule: independent} (docs/mup.md)."
        )
    run = recipe.get("run") or {}
    if run.get("size") is not None:
        raise ValueError(
            f"recipe {ref!r} selects run.size={run['size']!r}: mutransfer tunes optimizer.lr, so the recipe's lr must "
            "be optimizer.lr, not a per-size value; write the size's settings into the recipe instead."
        )
    optimizer = recipe.get("optimizer") or {}
    if optimizer.get("lr") is None:
        raise ValueError(f"recipe {ref!r} states no optimizer.lr: mutransfer centres its lr grid on the recipe's lr.")
    wd = optimizer.get("weight_decay") or 0.0
    if isinstance(wd, str):
        raise ValueError(
            f"recipe {ref!r}: optimizer.weight_decay={wd!r} follows the lr; mutransfer needs a number it can tune."
        )
    data = {"corpus": "tinyshakespeare", "tokenizer": "char", "block_size": 128, **(recipe.get("data") or {})}
    vocab = tokenize(read_text(data["corpus"]), data["tokenizer"])[1]
    shape = Shape(model["hidden_size"], model["num_layers"], model["num_heads"], model.get("intermediate_size"))
    return Target(
        ref=ref,
        recipe=recipe,
        shape=shape,
        arch=model["arch"],
        lr=float(optimizer["lr"]),
        weight_decay=float(wd),
        mup=dict(mup),
        vocab_size=vocab,
        tokens_per_step=int(run.get("batch_size", 16)) * int(run.get("grad_accum", 1)) * int(data["block_size"]),
        steps=int(run.get("max_steps", 200)),
    )


def proxy_shape(target: Target, width: int | None, depth: int | None) -> Shape:
    """The proxy's sizes (default: the muP base width, the target's depth); a clear error for an impossible proxy."""
    t = target.shape
    width = target.base_width if width is None else width
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"--proxy-width must be an integer >= 1, got {width!r}.")
    if width > t.width:
        raise ValueError(
            f"--proxy-width {width} is wider than the target ({t.width}): the proxy is the small model; "
            f"pick a width <= {t.width} (the muP base width {target.base_width} is the default)."
        )
    if width % t.heads:
        raise ValueError(
            f"--proxy-width {width} is not a multiple of the target's {t.heads} heads: the proxy keeps the number "
            "of heads (as muP's base model does) and scales the head size."
        )
    inter = None
    if t.intermediate is not None:
        inter = t.intermediate * width / t.width
        if inter != int(inter):
            raise ValueError(
                f"--proxy-width {width}: the MLP width {t.intermediate} x {width}/{t.width} = {inter:g} is not an "
                "integer; pick a proxy width that divides it."
            )
        inter = int(inter)
    layers = t.layers
    if depth is not None:
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"--proxy-depth must be an integer >= 1, got {depth!r}.")
        if not target.has_depth_scaling:
            raise ValueError(
                f"--proxy-depth {depth}: the recipe has no depth scaling, so the best lr would move with depth. "
                "Set model.mup.base_depth and depth_alpha (1.0 = CompleteP, 0.5 = depth-muP; docs/mup.md)."
            )
        if depth > t.layers:
            raise ValueError(f"--proxy-depth {depth} is deeper than the target ({t.layers} layers).")
        layers = depth
    return Shape(width, layers, t.heads, inter)


def n_params(arch: str, shape: Shape, vocab: int, block_size: int) -> int:
    """Every parameter of the model ``hf-optim train`` builds (untied embeddings), counted from the sizes."""
    w, inter = shape.width, shape.intermediate or 4 * shape.width
    if arch == "llama":  # q, k, v, o; gate, up, down; two RMSNorms per layer; final norm; embedding and lm_head
        per_layer = 4 * w * w + 3 * w * inter + 2 * w
        return shape.layers * per_layer + w + 2 * vocab * w
    # GPT-2: fused qkv and out projection with biases, MLP with biases, two LayerNorms; position embedding
    per_layer = 4 * w * w + 4 * w + 2 * w * inter + inter + w + 4 * w
    return shape.layers * per_layer + 2 * w + 2 * vocab * w + block_size * w


def run_flops(target: Target, shape: Shape) -> float:
    """``6 N D`` of one run of ``shape`` with the target's horizon and batch."""
    block = int((target.recipe.get("data") or {}).get("block_size", 128))
    return 6.0 * n_params(target.arch, shape, target.vocab_size, block) * target.tokens_per_step * target.steps


def lr_grid(center_lr: float, span: int) -> list[float]:
    """log2 lrs, one ×2 step apart, ``span`` steps either side of the recipe's lr rounded to a power of two."""
    if isinstance(span, bool) or not isinstance(span, int) or span < 1:
        raise ValueError(f"--lr-span must be an integer >= 1, got {span!r}.")
    center = round(math.log2(center_lr))
    return [float(center + k) for k in range(-span, span + 1)]


def refine_steps(resolution: float) -> tuple[float, float]:
    """The lr offsets (log2) tried beside the best point after a stage: one step of the resolution either way."""
    if resolution not in LR_RESOLUTIONS:
        raise ValueError(
            f"--lr-resolution must be one of {LR_RESOLUTIONS} (x2 or x sqrt(2) steps), got {resolution!r}."
        )
    return (-resolution, resolution)


def planned_runs(target: Target, coarse: int, seeds: int, resolution: float = 1.0) -> dict[str, int]:
    """Proxy runs per stage (without the edge extensions of the coarse grid, which only run within the budget)."""
    steps = len(refine_steps(resolution))
    stages = {"lr": coarse, **({"lr_fine": steps} if resolution < 1 else {})}
    for name, factors in MULTIPLIER_FACTORS.items():
        stages[name] = len(factors)
    if target.tunes_weight_decay:
        stages["weight_decay"] = len(WD_FACTORS)
    stages["lr_final"] = steps
    return {name: n * seeds for name, n in stages.items()}


def check_budget(planned_flops: float, budget: float, direct_flops: float) -> None:
    """``budget``: the proxy search's FLOPs as a fraction of a direct sweep of the coarse grid at the target."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0:
        raise ValueError(f"--budget must be a number > 0 (a fraction of the direct sweep's FLOPs), got {budget!r}.")
    if planned_flops > budget * direct_flops:
        raise ValueError(
            f"--budget {budget:g}: the proxy search needs {planned_flops / direct_flops:.1%} of a direct sweep's FLOPs "
            f"({planned_flops:.3g} of {direct_flops:.3g}), more than the budget; use a narrower --proxy-width, fewer "
            "--seeds, a smaller --lr-span, or a larger --budget."
        )


def describe(target: Target, proxy: Shape) -> Mapping[str, Any]:
    """The sizes of both models, for the log and the provenance block."""
    return {
        "target": {"width": target.shape.width, "layers": target.shape.layers, "heads": target.shape.heads},
        "proxy": {"width": proxy.width, "layers": proxy.layers, "heads": proxy.heads},
    }
