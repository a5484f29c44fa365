"""Argument checks shared by every optimizer.

Every check raises a ``ValueError`` (or ``TypeError`` for a wrong type) whose message names the argument, the value
received and what is allowed, so a bad ``--optim_args`` string points straight at the culprit.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Sequence
from numbers import Real
from typing import Any


def closest(name: str, valid: Iterable[str]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest valid name, or an empty string."""
    match = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return f" Did you mean {match[0]!r}?" if match else ""


def check_number(name: str, value: Any, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    # bool is a subclass of int but `lr=True` is always a mistake.
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {value!r} of type {type(value).__name__}.")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be finite, got {value!r}.")


def check_non_negative(name: str, value: Any, *, allow_none: bool = False) -> None:
    check_number(name, value, allow_none=allow_none)
    if value is not None and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}.")


def check_positive(name: str, value: Any, *, allow_none: bool = False) -> None:
    check_number(name, value, allow_none=allow_none)
    if value is not None and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}.")


def check_unit_interval(name: str, value: Any, *, allow_none: bool = False) -> None:
    """A decay rate: 0 <= value < 1."""
    check_number(name, value, allow_none=allow_none)
    if value is not None and not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}.")


def check_betas(name: str, betas: Any) -> None:
    if not isinstance(betas, Sequence) or isinstance(betas, str) or len(betas) != 2:
        raise ValueError(f"{name} must be a pair (beta1, beta2) with each in [0, 1), got {betas!r}.")
    for index, beta in enumerate(betas):
        check_unit_interval(f"{name}[{index}]", beta)


def check_choice(name: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        hint = closest(value, allowed) if isinstance(value, str) else ""
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}.{hint}")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} of type {type(value).__name__}.")


def check_dense_grad(grad: Any, optimizer: str) -> None:
    if grad.is_sparse:
        raise ValueError(
            f"{optimizer} does not support sparse gradients. Use dense embeddings "
            "(nn.Embedding(sparse=False)) or torch.optim.SparseAdam for sparse ones."
        )
