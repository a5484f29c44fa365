"""Forward pre-hooks that multiply a module's input by a constant: the readout multiplier of muP, the embedding
normaliser and the MoE routers' multipliers. Plain picklable, deep-copyable objects, kept apart from the surgery so
that the per-architecture adapters can use them without importing it."""

from __future__ import annotations

from typing import Any

from torch import nn


class ReadoutMultiplier:
    """Forward pre-hook multiplying the readout's input by a constant (a plain picklable, deep-copyable object)."""

    def __init__(self, multiplier: float) -> None:
        self.multiplier = float(multiplier)

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (args[0] * self.multiplier, *args[1:])

    def __repr__(self) -> str:
        return f"ReadoutMultiplier({self.multiplier})"


def input_multiplier(module: nn.Module) -> float | None:
    """The :class:`ReadoutMultiplier` of ``module`` (``None`` without one; a ValueError with several)."""
    hooks = [h for h in module._forward_pre_hooks.values() if isinstance(h, ReadoutMultiplier)]
    if len(hooks) > 1:
        raise ValueError(f"{type(module).__name__} has {len(hooks)} muP input multipliers; expected at most one.")
    return hooks[0].multiplier if hooks else None


def set_input_multiplier(module: nn.Module, multiplier: float | None) -> None:
    """Replace ``module``'s :class:`ReadoutMultiplier` by one with ``multiplier`` (``None``: remove it)."""
    for key, hook in list(module._forward_pre_hooks.items()):
        if isinstance(hook, ReadoutMultiplier):
            del module._forward_pre_hooks[key]
    if multiplier is not None:
        module.register_forward_pre_hook(ReadoutMultiplier(multiplier))
