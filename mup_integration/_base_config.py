"""The narrow base config a plan compares against: :func:`derive_base_config` copies a transformers config at a
smaller hidden size (MLP width and head dim scaled or fixed), and the hidden size / head dim a config states."""

from __future__ import annotations

import copy
from typing import Any

from hf_optim import _validation as v

from .storage import clear_plan


def config_hidden_size(config: Any) -> int:
    size = getattr(config, "hidden_size", None)
    if not isinstance(size, int):
        raise ValueError(f"config of type {type(config).__name__} has no integer hidden_size; muP needs one.")
    return size


def config_head_dim(config: Any) -> int:
    head_dim = getattr(config, "head_dim", None)
    return int(head_dim) if head_dim else config_hidden_size(config) // config.num_attention_heads


def derive_base_config(
    config: Any, base_width: int, *, base_head_dim: int | None = None, base_intermediate_size: int | None = None
) -> Any:
    """A copy of ``config`` at hidden size ``base_width``.

    The MLP width follows proportionally unless ``base_intermediate_size`` is given. The head dim follows
    proportionally (same number of heads) unless ``base_head_dim`` is given (then the number of heads changes and the
    query/key-value head ratio is kept).
    """
    width = config_hidden_size(config)
    v.check_positive("base_width", base_width)
    if not isinstance(base_width, int):
        raise TypeError(f"base_width must be an int, got {base_width!r}.")
    base = copy.deepcopy(config)
    clear_plan(base)
    base.hidden_size = base_width
    ratio = base_width / width

    def scaled(name: str, value: int) -> int:
        result = value * ratio
        if abs(result - round(result)) > 1e-9 or round(result) < 1:
            raise ValueError(
                f"{name}={value} does not scale to an integer at base_width={base_width} (hidden size "
                f"{width}); pass it explicitly (base_{name}=...)."
            )
        return round(result)

    moe = getattr(config, "moe_intermediate_size", None)
    if isinstance(moe, int):  # Qwen3-MoE's expert width: always proportional
        base.moe_intermediate_size = scaled("moe_intermediate_size", moe)
    for attr in ("intermediate_size", "n_inner"):  # LLaMA family / GPT-2 (None there = 4 * hidden)
        value = getattr(config, attr, None)
        if isinstance(value, int):
            setattr(base, attr, base_intermediate_size or scaled("intermediate_size", value))
        elif attr == "n_inner" and base_intermediate_size is not None and hasattr(config, "n_inner"):
            base.n_inner = base_intermediate_size
    heads = config.num_attention_heads
    if base_head_dim is None:
        base_head_dim = scaled("head_dim", config_head_dim(config))
    elif base_width % base_head_dim:
        raise ValueError(f"base_head_dim={base_head_dim} must divide base_width={base_width}.")
    else:
        kv = getattr(config, "num_key_value_heads", None)
        new_heads = base_width // base_head_dim
        base.num_attention_heads = new_heads
        if kv is not None:
            base.num_key_value_heads = max(1, new_heads * kv // heads)
    if getattr(config, "head_dim", None) is not None or base_head_dim * base.num_attention_heads != base_width:
        base.head_dim = base_head_dim
    return base
