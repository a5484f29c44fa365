"""The model axes of a sweep grid: ``depth`` (``model.layers``) and muP's base multipliers (``output_mult``,
``attn_mult``, ``init_std``), each expanded into one :class:`ModelSettings` per value.

The multipliers are the constants Tensor Programs V (Yang et al. 2022, §3 and Fig. 4) tunes at the base width and
transfers with the learning rate: ``output_mult`` scales the readout's input (logits = output_mult / m · W h),
``attn_mult`` the attention logits, ``init_std`` the base initialisation σ (muP divides the hidden matrices' σ by
√m). ``output_mult`` and ``attn_mult`` are muP plan constants, so an SP grid cannot take them; ``init_std`` is HF's
``initializer_range`` and applies to both.
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Any

from ._sweep_values import as_float, as_int, as_list

#: Grid axes over muP's base multipliers: axis -> ModelSettings field (the same name).
MULTIPLIER_AXES = ("output_mult", "attn_mult", "init_std")
#: ``sp``, width-only ``mup``, and muP with depth scaling (mup_integration.depth): parametrization -> depth_alpha.
DEPTH_ALPHA = {"depth_mup": 0.5, "completep": 1.0}


def depth_axis(grid: dict[str, Any], model: Any, widths: list[int], params: list[str], where: str) -> list[Any]:
    """The grid's model settings, one per ``depth`` (``model.layers``) when the grid has a depth axis."""
    if any(p in DEPTH_ALPHA for p in params) and model.base_depth is None:
        raise ValueError(
            f"{where}: parametrizations {sorted(set(params) & set(DEPTH_ALPHA))} need "
            "model.base_depth (the depth the lr is tuned at)."
        )
    if "depth" not in grid:
        return [model]
    depths = [as_int(f"{where}: depth", d) for d in as_list(grid, "depth", where)]
    if min(depths) < 1:
        raise ValueError(f"{where}: depth must be >= 1, got {depths!r}.")
    if len(depths) > 1 and len(widths) > 1:
        # the width analysis averages over everything but the width: a grid varies one of the two
        raise ValueError(f"{where}: a grid varies width or depth, not both (got widths {widths}, depths {depths}).")
    return [replace(model, layers=d) for d in depths]


def multiplier_axes(grid: dict[str, Any], models: list[Any], widths: list[int], params: list[str], where: str):
    """``models`` times every combination of the grid's multiplier axes (none: ``models`` unchanged).

    A grid that varies the multipliers stays at one width and one depth: the width and depth analyses average over
    everything but their own axis, so a multiplier axis beside them would blur their curves.
    """
    axes = {name: as_list(grid, name, where) for name in MULTIPLIER_AXES if name in grid}
    if not axes:
        return models
    values = {name: [as_float(f"{where}: {name}", x) for x in raw] for name, raw in axes.items()}
    for name, xs in values.items():
        if min(xs) <= 0:
            raise ValueError(f"{where}: {name} must be > 0, got {xs!r}.")
    varied = sorted(name for name, xs in values.items() if len(set(xs)) > 1)
    if varied and (len(widths) > 1 or len(models) > 1):
        raise ValueError(
            f"{where}: a grid varies the width or depth, or the multipliers {varied}, not both "
            f"(got widths {widths}, depths {[m.layers for m in models]})."
        )
    plan_only = sorted(set(values) & {"output_mult", "attn_mult"})
    if "sp" in params and any(x != 1.0 for name in plan_only for x in values[name]):
        raise ValueError(
            f"{where}: {plan_only} are muP plan constants; parametrization 'sp' has none (use a separate grid "
            "for SP, or init_std, which applies to both)."
        )
    names = list(values)
    return [
        replace(model, **dict(zip(names, combo)))
        for model in models
        for combo in itertools.product(*(values[n] for n in names))
    ]
