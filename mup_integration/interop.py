"""Interop with microsoft/mup: infshapes (``mup.set_base_shapes``) and ``.bsh`` base-shape files -> a name-keyed plan.

A ``.bsh`` file is YAML mapping each parameter name to its base shape, with ``null`` for a dimension that does not
scale with width (mup's format; read here with ``yaml.safe_load`` only). ``mup`` itself is not needed by this module:
an infshape is read through its public methods only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import yaml
from torch import nn

from .plan import MuPPlan, ParamInfo, _fan_dims, _param_info, unwrap

_BSH_HEADER = (
    "# muP base shapes (YAML, the format of microsoft/mup's .bsh files)\n"
    "# - each parameter name maps to its base shape\n"
    "# - null: a dimension that does not grow with width; a number: the base size of a width dimension\n"
)

BaseShapes = dict[str, list[int | None]]


def _info(
    shape: tuple[int, ...], base_shape: tuple[int | None, ...], fans: tuple[int | None, int | None], name: str
) -> ParamInfo:
    if len(shape) != len(base_shape):
        raise ValueError(
            f"{name}: base shape {list(base_shape)} has {len(base_shape)} dims, the parameter "
            f"{list(shape)} has {len(shape)}."
        )
    mults = []
    for i, (n, n0) in enumerate(zip(shape, base_shape)):
        if n0 is not None and (not isinstance(n0, int) or n0 <= 0):
            raise ValueError(f"{name}: base dimension {i} must be a positive int or null, got {n0!r}.")
        if n0 is not None and n < n0:
            raise ValueError(f"{name}: the base is wider than the model in dimension {i} ({n0} > {n}).")
        mults.append(1.0 if n0 is None else n / n0)
    return _param_info(shape, base_shape, mults, fans)


def plan_from_base_shapes(
    model: nn.Module,
    base_shapes: Mapping[str, Any] | str | os.PathLike,
    *,
    output_mult: float = 1.0,
    attn_mult: float = 1.0,
    base_head_dim: int | None = None,
) -> MuPPlan:
    """A plan for ``model`` (may be on the meta device) from base shapes: a dict name -> base shape, or a .bsh path.

    Entries may be mup ``InfShape`` objects (their ``base_shape()`` is used). ``base_head_dim`` defaults to the
    model's head dim divided by the width multiplier (heads fixed, head dim growing with width).
    """
    if isinstance(base_shapes, (str, os.PathLike)):
        base_shapes = load_base_shapes(base_shapes)
    inner = unwrap(model)
    names = [n for n, _ in inner.named_parameters()]
    bsh = {}
    for key, value in base_shapes.items():  # mup's files may carry the `module.` prefix of a DDP model
        key = key[len("module.") :] if key.startswith("module.") and key not in names else key
        bsh[key] = tuple(value.base_shape()) if hasattr(value, "base_shape") else tuple(value)
    extra, missing = sorted(set(bsh) - set(names)), sorted(set(names) - set(bsh))
    if extra or missing:
        raise ValueError(
            f"The base shapes do not match the model's parameters: missing {missing[:3]} "
            f"({len(missing)}), unknown {extra[:3]} ({len(extra)})."
        )
    params = {}
    for mod_name, module in inner.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            if name in bsh and name not in params:
                params[name] = _info(tuple(p.shape), bsh[name], _fan_dims(module, p_name, p.dim()), name)
    # The readout's input width (tied: the embedding's width) sets the output multiplier 1/width_mult.
    readout = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    readout_name = next((n for n, p in inner.named_parameters() if readout is not None and p is readout.weight), None)
    if readout_name is not None:
        width_mult = params[readout_name].width_mult
    else:
        width_mult = max((i.width_mult for i in params.values()), default=1.0)
    head_dims = {m.head_dim for m in inner.modules() if hasattr(m, "head_dim") and hasattr(m, "scaling")}
    head_dim = head_dims.pop() if len(head_dims) == 1 else None
    if head_dim is not None and base_head_dim is None:
        base_head_dim = round(head_dim / width_mult) or 1
    return MuPPlan(
        params=params,
        width_mult=width_mult,
        head_dim=head_dim,
        base_head_dim=base_head_dim,
        output_mult=float(output_mult),
        attn_mult=float(attn_mult),
    )


def plan_from_infshapes(model: nn.Module, **kwargs: Any) -> MuPPlan:
    """A plan from a model prepared with ``mup.set_base_shapes`` (reads each ``p.infshape``)."""
    shapes = {}
    for name, p in unwrap(model).named_parameters():
        if not hasattr(p, "infshape"):
            raise ValueError(
                f"Parameter {name!r} has no `infshape` attribute: call mup.set_base_shapes(model, base) "
                "first (deepcopy, FSDP2, to_empty and load_state_dict(assign=True) drop it)."
            )
        shapes[name] = p.infshape
    return plan_from_base_shapes(model, shapes, **kwargs)


def base_shapes_of(plan: MuPPlan) -> BaseShapes:
    """name -> base shape (``None`` for non-width dims), the content of a .bsh file."""
    return {name: list(info.base_shape) for name, info in plan.params.items()}


def save_base_shapes(plan: MuPPlan, path: str | os.PathLike) -> None:
    """Write ``plan``'s base shapes as a .bsh file that ``mup.load_base_shapes`` / ``set_base_shapes`` can read."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(_BSH_HEADER)
        yaml.safe_dump(base_shapes_of(plan), f, indent=4, default_flow_style=None, sort_keys=False)


def load_base_shapes(path: str | os.PathLike) -> BaseShapes:
    """Read a .bsh file (``yaml.safe_load``) into name -> base shape, validating its structure."""
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict):
        raise ValueError(
            f"{os.fspath(path)!r} is not a base-shape file: expected a YAML mapping name -> list, got "
            f"{type(data).__name__}."
        )
    for name, shape in data.items():
        if not isinstance(shape, list) or not all(d is None or (isinstance(d, int) and d > 0) for d in shape):
            raise ValueError(
                f"{os.fspath(path)!r}: entry {name!r} must be a list of positive ints or null, got {shape!r}."
            )
    return data
