"""The fixed settings of a sweep cell, model and training, with the type and range checks of every field.

Split from :mod:`._sweep_config` (which expands grids into cells) so that :mod:`._sweep_model` can read the settings
without importing the grid code.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from hf_optim import _validation as v

from ._sweep_values import as_float, as_int

ARCHS = ("llama", "olmo2")
DECAY_SETS = ("all", "hidden")
SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class ModelSettings:
    """A small LLaMA (or OLMo-2): width = hidden size; heads = width / head_dim (fixed head size, so muP's attention
    scale is a constant); MLP width = ffn_mult × width."""

    arch: str = "llama"  # "llama" | "olmo2"; left out of the cell key at its default (see Cell.key)
    layers: int = 2
    head_dim: int = 32
    ffn_mult: int = 2
    seq_len: int = 64
    batch_size: int = 8
    base_width: int = 64  # muP base shape
    init_std: float = 0.02  # LlamaConfig.initializer_range
    # RMSNorm eps (on the mean square); None = the architecture's default (LLaMA 1e-6, OLMo-2 1e-5). It bounds how
    # far a normalised branch is scale-invariant: a branch whose mean square is ~eps is damped, not normalised, and a
    # width-64 block of 0.02-std matrices (or a strongly decayed one) outputs a mean square of 1e-5..1e-7.
    norm_eps: float | None = None
    # The tuned depth of the depth parametrizations (``depth_mup``, ``completep``): m_L = layers / base_depth. Left
    # out of the cell key when unset.
    base_depth: int | None = None
    # muP's tunable base multipliers (mup_integration.make_plan; _sweep_axes): readout and attention-logit
    # constants. Left out of the cell key at 1.
    output_mult: float = 1.0
    attn_mult: float = 1.0


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 150
    warmup_steps: int = 15
    schedule: str = "cosine"  # "cosine" (to min_lr_ratio) or "constant" (after warm-up)
    min_lr_ratio: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 0.0  # 0 = off: clipping would hide the divergence that SP shows at large lr
    eval_batches: int = 8
    train_chars: int | None = None
    diverge_loss: float = 10.0  # a training loss above this (or NaN/inf) stops the cell as diverged
    # Which tensors weight decay applies to: "all" >= 2-D tensors (embedding and lm_head included, the committed
    # width/LR x WD sweeps) or only the "hidden" attention/MLP matrices. Left out of the cell key at its default.
    decay: str = "all"
    # Instead of steps / warmup_steps (_sweep_config module docstring, _sweep_model.fit_horizon); not in the key unset.
    tokens_per_param: float | None = None
    warmup_fraction: float | None = None


# Per-field checks beyond the type: (predicate, what is allowed). Types come from the dataclass annotations.
_LIMITS: dict[str, tuple[Any, str]] = {
    "arch": (lambda x: x in ARCHS, f"one of {list(ARCHS)}"),
    "layers": (lambda x: x >= 1, ">= 1"),
    "head_dim": (lambda x: x >= 1, ">= 1"),
    "ffn_mult": (lambda x: x >= 1, ">= 1"),
    "seq_len": (lambda x: x >= 1, ">= 1"),
    "batch_size": (lambda x: x >= 1, ">= 1"),
    "base_width": (lambda x: x >= 1, ">= 1"),
    "init_std": (lambda x: x > 0, "> 0"),
    "norm_eps": (lambda x: x is None or x > 0, "> 0 or null"),
    "base_depth": (lambda x: x is None or x >= 1, ">= 1 or null"),
    "output_mult": (lambda x: x > 0, "> 0"),
    "attn_mult": (lambda x: x > 0, "> 0"),
    "steps": (lambda x: x >= 1, ">= 1"),
    "warmup_steps": (lambda x: x >= 0, ">= 0"),
    "schedule": (lambda x: x in SCHEDULES, f"one of {list(SCHEDULES)}"),
    "min_lr_ratio": (lambda x: 0 <= x <= 1, "in [0, 1]"),
    "beta1": (lambda x: 0 <= x < 1, "in [0, 1)"),
    "beta2": (lambda x: 0 <= x < 1, "in [0, 1)"),
    "eps": (lambda x: x >= 0, ">= 0"),
    "grad_clip": (lambda x: x >= 0, ">= 0"),
    "eval_batches": (lambda x: x >= 1, ">= 1"),
    "train_chars": (lambda x: x is None or x >= 1, ">= 1 or null"),
    "diverge_loss": (lambda x: x > 0, "> 0"),
    "decay": (lambda x: x in DECAY_SETS, f"one of {list(DECAY_SETS)}"),
    "tokens_per_param": (lambda x: x is None or x > 0, "> 0 or null"),
    "warmup_fraction": (lambda x: x is None or 0 <= x < 1, "in [0, 1) or null"),
}
#: Keys that set the same thing two ways: one block (the top-level ``train`` or a grid's) may give only one of each.
EXCLUSIVE_TRAIN_KEYS = (("steps", "tokens_per_param"), ("warmup_steps", "warmup_fraction"))


_CHOICES: dict[str, tuple[str, ...]] = {"arch": ARCHS, "schedule": SCHEDULES, "decay": DECAY_SETS}


def checked_settings(cls: type, raw: dict[str, Any], where: str) -> dict[str, Any]:
    """``raw`` with every value type-checked against ``cls``'s annotations, coerced (int -> float where a float is
    expected, so ``1`` and ``1.0`` give the same cell key) and range-checked; errors name ``where.key``."""
    out: dict[str, Any] = {}
    for f in fields(cls):
        if f.name not in raw:
            continue
        value, name = raw[f.name], f"{where}.{f.name}"
        kind = str(f.type).replace(" ", "")
        if kind in ("int|None", "float|None") and value is None:
            pass
        elif kind in ("int", "int|None"):
            value = as_int(name, value)
        elif kind in ("float", "float|None"):
            value = as_float(name, value)
        elif kind == "str":
            if not isinstance(value, str):
                raise ValueError(f"{name} must be a string, got {value!r}.")
        else:  # a new field with an unhandled annotation must not slip through unchecked
            raise TypeError(f"{cls.__name__}.{f.name}: no check for annotation {f.type!r}.")
        ok, allowed = _LIMITS[f.name]
        if not ok(value):
            hint = v.closest(value, _CHOICES.get(f.name, ())) if isinstance(value, str) else ""
            raise ValueError(f"{name} must be {allowed}, got {value!r}.{hint}")
        out[f.name] = value
    return out
