r"""The four meanings of ``weight_decay``, in one place.

Every optimizer of this package takes ``weight_decay`` (λ) and ``weight_decay_mode``. With :math:`\alpha_t` the
group's current learning rate and :math:`\alpha` its peak learning rate (``lr_peak``, recorded when the group is
created, like the ``initial_lr`` that torch's schedulers record), one step of decay is:

===============  ====================================================  ==========================================
mode             update                                                 where it comes from
===============  ====================================================  ==========================================
``l2``           :math:`g \leftarrow g + \lambda x` (before moments)    ``torch.optim.Adam(weight_decay=λ)``
``coupled``      :math:`x \leftarrow x\,(1 - \alpha_t \lambda)`          ``torch.optim.AdamW``; LLaMA/GPT-3 "0.1"
``independent``  :math:`x \leftarrow x\,(1 - (\alpha_t/\alpha)\,\lambda)`  Loshchilov & Hutter; Composer; big_vision
``corrected``    :math:`x \leftarrow x\,(1 - (\alpha_t^2/\alpha)\,\lambda)` PaLM's ``lr²`` decay when λ = α
===============  ====================================================  ==========================================

The decoupled modes are all "torch AdamW with a different λ": :func:`coupled_equivalent` returns the λ' such that
:math:`x (1 - \alpha_t \lambda')` is the mode's update, which lets fused kernels serve every mode.

``independent`` expects λ of order 1e-5…1e-4 (it is not multiplied by the learning rate); a value that looks like an
lr-coupled one (λ >= 1e-3) triggers a warning once, because it decays ~1000x faster than the user probably meant.

``independent`` and ``corrected`` divide by the peak lr :math:`\alpha`. A group created with ``lr=0`` records
``lr_peak = 0``, for which the ratio is undefined: the decay is then **off** (rate 0, never a division by zero or a
NaN), and :func:`check_lr_peak` warns when such a group asks for λ > 0. A warning rather than an error, because
``lr=0`` groups are legitimate (frozen layers, an lr set by hand each step): create the optimizer with the peak lr
(schedulers scale it from there) or set ``group["lr_peak"]`` explicitly.

**Which peak** (:func:`resolve_lr_peak`, at every step): a torch scheduler that records a peak in the group wins:
``max_lr`` (``OneCycleLR``), else the larger of ``initial_lr`` (every ``LRScheduler`` records the lr it scales) and
the lr at creation. So ``OneCycleLR(max_lr=1e-2)`` on an optimizer built with ``lr=1e-3`` decays by λ at the peak
step, not 10λ. ``CyclicLR`` keeps its ``max_lr`` on the scheduler only: build the optimizer with ``lr=max_lr`` (or
set ``group["max_lr"]``). When the lr still exceeds the peak (raised by hand, or a scheduler without a record),
:func:`warn_lr_above_peak` warns once per group: the decay per step then exceeds λ.
"""

from __future__ import annotations

import warnings
from typing import Any, Final, Literal

from ._validation import check_choice

WeightDecayMode = Literal["l2", "coupled", "independent", "corrected"]
WEIGHT_DECAY_MODES: Final[tuple[str, ...]] = ("l2", "coupled", "independent", "corrected")
DECOUPLED_MODES: Final[frozenset[str]] = frozenset({"coupled", "independent", "corrected"})

# Above this, an `independent` λ looks like a PyTorch-AdamW value (0.1, 0.01) rather than a schedule-only rate.
INDEPENDENT_WD_WARN_THRESHOLD: Final[float] = 1e-3


def check_weight_decay_mode(mode: str, weight_decay: float) -> None:
    """Validate the mode; warn when an ``independent`` λ looks lr-coupled."""
    check_choice("weight_decay_mode", mode, WEIGHT_DECAY_MODES)
    if mode == "independent" and weight_decay >= INDEPENDENT_WD_WARN_THRESHOLD:
        warnings.warn(
            f"weight_decay={weight_decay} with weight_decay_mode='independent' removes {weight_decay * 100:.3g}% of each "
            "weight per step at peak learning rate. Independent decay is not multiplied by the learning rate: "
            "typical values are 1e-5..1e-4. For PyTorch-AdamW semantics (LLaMA/GPT-3 'weight_decay=0.1') use "
            "weight_decay_mode='coupled'.",
            UserWarning,
            stacklevel=4,
        )


def check_lr_peak(mode: str, weight_decay: Any, lr_peak: float) -> None:
    """Warn when a mode that divides by the peak lr gets ``lr_peak == 0`` with λ > 0 (its decay would silently be 0)."""
    if (
        mode in ("independent", "corrected")
        and isinstance(weight_decay, (int, float))
        and weight_decay > 0
        and lr_peak == 0
    ):
        warnings.warn(
            f"weight_decay={weight_decay} with weight_decay_mode={mode!r} is disabled for this group: its peak lr "
            "(lr_peak, the lr at creation) is 0, and this mode scales the decay by lr_t/lr_peak. Create the "
            "optimizer with the peak lr (let a scheduler warm it up) or set group['lr_peak'] to it.",
            UserWarning,
            stacklevel=4,
        )


def resolve_lr_peak(group: dict[str, Any]) -> float:
    """The peak lr of a group: a scheduler's ``max_lr`` if recorded, else max(``initial_lr``, ``lr_peak``)."""
    peak = group.get("max_lr")
    if _is_number(peak):
        return float(peak)
    peak = group.get("lr_peak", group["lr"])
    initial = group.get("initial_lr")
    return max(float(peak), float(initial)) if _is_number(initial) else peak


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def warn_lr_above_peak(index: int, group: dict[str, Any]) -> bool:
    """Warn (and return True) when a mode that divides by the peak lr runs above it: the decay then exceeds λ."""
    mode, wd, lr, peak = group.get("weight_decay_mode"), group.get("weight_decay"), group["lr"], group["lr_peak"]
    if (
        mode not in ("independent", "corrected")
        or not _is_number(wd)
        or wd <= 0
        or not _is_number(lr)
        or peak <= 0
        or lr <= peak * (1.0 + 1e-9)
    ):
        return False
    ratio = decay_rate(mode, wd, lr, peak) / decay_rate(mode, wd, peak, peak)  # lr/peak, or (lr/peak)² (corrected)
    warnings.warn(
        f"param_groups[{index}]: lr={lr:.6g} exceeds the group's peak lr lr_peak={peak:.6g}, so "
        f"weight_decay_mode={mode!r} decays {ratio:.3g}x more per step than at the peak (where 'independent' removes "
        "exactly weight_decay). Build the optimizer with the peak lr, let the scheduler record it (OneCycleLR's "
        "max_lr), or set group['lr_peak'] to it. Warned once per group.",
        UserWarning,
        stacklevel=4,
    )
    return True


def coupled_equivalent(mode: str, weight_decay: float, lr: float, lr_peak: float) -> float:
    """λ' such that this step's decay equals PyTorch AdamW's ``x *= 1 - lr·λ'``; 0 for ``l2``."""
    if mode == "coupled":
        return weight_decay
    if mode == "independent":
        return weight_decay / lr_peak if lr_peak > 0 else 0.0
    if mode == "corrected":
        return weight_decay * lr / lr_peak if lr_peak > 0 else 0.0
    return 0.0


def decay_rate(mode: str, weight_decay: float, lr: float, lr_peak: float) -> float:
    """The fraction of each weight removed this step by a decoupled mode (``x *= 1 - rate``); 0 for ``l2``."""
    return lr * coupled_equivalent(mode, weight_decay, lr, lr_peak)


def l2_coefficient(mode: str, weight_decay: float) -> float:
    """λ to add to the gradient (``g + λx``) before the moments; non-zero only for ``l2``."""
    return weight_decay if mode == "l2" else 0.0
