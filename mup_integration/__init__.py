"""muP for Hugging Face models: a name-keyed plan, model surgery, and plain per-parameter optimizer multipliers.

Typical use::

    from mup_integration import make_mup_model, param_overrides
    model = make_mup_model(LlamaConfig(hidden_size=1024, ...), base_width=256)
    opt = hf_optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-4, param_overrides=param_overrides(model))

See docs/mup.md for the rules as formulas and the coordinate check. The names below are imported lazily, so that the
optimizer core can read :mod:`mup_integration.vocabulary` without loading the muP machinery (and transformers).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "derive_base_config": "._base_config",
    "export_standard": ".export",
    "mup_param_groups": ".groups",
    "param_overrides": ".groups",
    "load_base_shapes": ".interop",
    "plan_from_base_shapes": ".interop",
    "plan_from_infshapes": ".interop",
    "save_base_shapes": ".interop",
    "MuPPlan": ".plan",
    "ParamInfo": ".plan",
    "get_plan": ".plan",
    "has_plan": ".plan",
    "make_plan": ".plan",
    "apply_mup": ".surgery",
    "from_pretrained": ".surgery",
    "init_weights": ".surgery",
    "is_mup_applied": ".surgery",
    "load_mup_model": ".surgery",
    "make_mup_model": ".surgery",
}

__all__ = [
    "MuPPlan",
    "ParamInfo",
    "apply_mup",
    "derive_base_config",
    "export_standard",
    "from_pretrained",
    "get_plan",
    "has_plan",
    "init_weights",
    "is_mup_applied",
    "load_base_shapes",
    "load_mup_model",
    "make_mup_model",
    "make_plan",
    "mup_param_groups",
    "param_overrides",
    "plan_from_base_shapes",
    "plan_from_infshapes",
    "save_base_shapes",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'mup_integration' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
