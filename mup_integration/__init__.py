"""muP for Hugging Face models: a name-keyed plan, model surgery, and plain per-parameter optimizer multipliers.

Typical use::

    from mup_integration import make_mup_model, param_overrides
    model = make_mup_model(LlamaConfig(hidden_size=1024, ...), base_width=256)
    opt = hf_optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-4, param_overrides=param_overrides(model))

See docs/mup.md for the rules as formulas and the coordinate check.
"""

from ._base_config import derive_base_config
from .export import export_standard
from .groups import mup_param_groups, param_overrides
from .interop import load_base_shapes, plan_from_base_shapes, plan_from_infshapes, save_base_shapes
from .plan import MuPPlan, ParamInfo, get_plan, has_plan, make_plan
from .surgery import (
    apply_mup,
    from_pretrained,
    init_weights,
    is_mup_applied,
    load_mup_model,
    make_mup_model,
)

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
