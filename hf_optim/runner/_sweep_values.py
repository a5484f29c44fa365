"""Numbers read from a sweep configuration: :func:`as_int` and :func:`as_float` accept only real, finite (and, for
ints, integral) numbers, with a hint when YAML 1.1 read an exponent like ``1e-1`` as a string. No silent coercion."""

from __future__ import annotations

import math
from typing import Any


def _yaml_string_hint(value: Any) -> str:
    """Why a number arrived as a string: PyYAML follows YAML 1.1, where ``1e-1`` (no dot) is not a float."""
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return ""
        return " (YAML 1.1 reads exponents without a dot, like 1e-1, as strings: write 1.0e-1 or 0.1)"
    return ""


def as_int(where: str, value: Any) -> int:
    """``value`` as an int; a ValueError for bools, strings and non-integral numbers (no silent truncation)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (isinstance(value, float) and (not math.isfinite(value) or not value.is_integer()))
    ):
        raise ValueError(f"{where} must be an integer, got {value!r}{_yaml_string_hint(value)}.")
    return int(value)


def as_float(where: str, value: Any) -> float:
    """``value`` as a finite float; a ValueError for bools, strings (see ``_yaml_string_hint``) and NaN/inf."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where} must be a finite number, got {value!r}{_yaml_string_hint(value)}.")
    return float(value)


def as_list(raw: dict[str, Any], key: str, where: str, default: list[Any] | None = None) -> list[Any]:
    """``raw[key]`` as a non-empty list (``default`` when absent); a ValueError naming ``where`` and ``key``."""
    value = raw.get(key, default)
    if value is None:
        raise ValueError(f"{where}: {key!r} is required (a list).")
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: {key!r} must be a non-empty list, got {value!r}.")
    return value
