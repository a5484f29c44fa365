"""Muon with its fallback optimizer in one object (``optimizer``), Newton-Schulz / SVD orthogonalisation
(``orthogonalize``) and QK-clip (``qk_clip``).

The classes are imported on first use: the core's state loader reads this family's plain data (e.g. Adafactor's
presets) without loading the classes, which themselves build on the core.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["Muon"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module(f"{__name__}.optimizer"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
