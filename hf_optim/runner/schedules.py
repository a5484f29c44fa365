r"""Learning-rate schedules the published recipes need, as multipliers :math:`\eta(k)` of each group's peak lr.

Every schedule here is a pure function ``multiplier(k) -> float`` of the number of optimizer steps already taken
(``k = 0`` for the first update, as ``torch.optim.lr_scheduler.LambdaLR`` counts), wrapped in a ``LambdaLR`` so the
lr of every parameter group (muP-scaled or not) is ``group_peak_lr · η(k)``.

=====================  =========================================================================  =====================
name                   :math:`\eta(k)` (W = ``num_warmup_steps``, T = ``num_training_steps``)     used by
=====================  =========================================================================  =====================
``cosine_to_floor``    :math:`k/W` for :math:`k<W`; then                                          LLaMA-1/2/3, GPT-3,
                       :math:`f + (1-f)\tfrac12(1+\cos\pi\,p)`, :math:`p=\min(1,\tfrac{k-W}        Pythia, BLOOM, OLMo-2
                       {D-W})`, D = ``decay_steps`` (default T), floor f
``linear_to_floor``    as above with :math:`1 - (1-f)\,p`                                          OPT
``inverse_sqrt_max``   :math:`\sqrt{n / \max(k, n)}` (n = ``plateau_steps``), times                 T5, PaLM
                       :math:`k/W` during an optional warm-up
``step_decay``         :math:`k/W` warm-up, then :math:`\prod_{i: k \ge m_i T} \gamma_i`           DeepSeek-V2(-Lite)
``phases``             warm-up, then consecutive phases ending at fractions of T, each              DeepSeek-V3
                       ``constant`` (optionally jumping to ``value``) or ``cosine``/``linear``
                       from the previous value ``to`` a target
=====================  =========================================================================  =====================

T5 (Raffel et al. 2020, §3.1.2) uses :math:`1/\sqrt{\max(k, 10^4)}`; PaLM (Chowdhery et al. 2022, §5) uses 1e-2 for
10k steps, then :math:`10^{-2}\sqrt{10^4/k}`. Both are ``inverse_sqrt_max`` with ``plateau_steps=10_000`` and peak lr
1e-2 (``1/sqrt(1e4) = 1e-2``). transformers' own ``inverse_sqrt`` is shifted (:math:`1/\sqrt{(k+s)/s}`), hence a
separate name.

Use them with the Trainer either through :class:`hf_optim.runner.train.RecipeTrainer` (which reads ``schedule:`` from a
recipe), or by building the scheduler yourself: ``Trainer(optimizers=(opt, make_scheduler(opt, "cosine_to_floor",
num_training_steps=T, num_warmup_steps=2000, floor=0.1)))``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from hf_optim import _validation as v

Multiplier = Callable[[int], float]


def _warmup(k: int, warmup: int) -> float:
    # Linear from 0 at k=0; the first update uses lr 0 exactly as transformers' warm-up schedules do.
    return k / warmup if warmup > 0 and k < warmup else 1.0


def _decay_progress(k: int, warmup: int, decay_steps: int) -> float:
    span = decay_steps - warmup
    return 1.0 if span <= 0 else min(1.0, max(0.0, (k - warmup) / span))


def cosine_to_floor(k: int, *, num_warmup_steps: int, decay_steps: int, floor: float) -> float:
    if k < num_warmup_steps:
        return _warmup(k, num_warmup_steps)
    p = _decay_progress(k, num_warmup_steps, decay_steps)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * p))


def linear_to_floor(k: int, *, num_warmup_steps: int, decay_steps: int, floor: float) -> float:
    if k < num_warmup_steps:
        return _warmup(k, num_warmup_steps)
    return 1.0 - (1.0 - floor) * _decay_progress(k, num_warmup_steps, decay_steps)


def inverse_sqrt_max(k: int, *, num_warmup_steps: int, plateau_steps: int) -> float:
    return _warmup(k, num_warmup_steps) * math.sqrt(plateau_steps / max(k, plateau_steps))


def step_decay(
    k: int, *, num_warmup_steps: int, num_training_steps: int, milestones: Sequence[float], factors: Sequence[float]
) -> float:
    value = _warmup(k, num_warmup_steps)
    for fraction, factor in zip(milestones, factors):
        if k >= fraction * num_training_steps:
            value *= factor
    return value


def phases(k: int, *, num_warmup_steps: int, num_training_steps: int, spec: Sequence[Mapping[str, Any]]) -> float:
    if k < num_warmup_steps:
        return _warmup(k, num_warmup_steps)
    start_step, start_value = num_warmup_steps, 1.0
    for phase in spec:
        end_step = phase["until"] * num_training_steps
        shape = phase.get("shape", "constant")
        if shape == "constant":
            value = float(phase.get("value", start_value))
            if k < end_step:
                return value
            start_value = value
        else:
            target = float(phase["to"])
            if k < end_step:
                p = (k - start_step) / (end_step - start_step) if end_step > start_step else 1.0
                weight = 0.5 * (1.0 + math.cos(math.pi * p)) if shape == "cosine" else 1.0 - p
                return target + (start_value - target) * weight
            start_value = target
        start_step = end_step
    return start_value


def _check_phases(spec: Any) -> None:
    if not isinstance(spec, Sequence) or isinstance(spec, str) or not spec:
        raise ValueError(f"phases must be a non-empty list of {{until, shape, to|value}} mappings, got {spec!r}.")
    previous = 0.0
    for index, phase in enumerate(spec):
        name = f"phases[{index}]"
        if not isinstance(phase, Mapping):
            raise TypeError(f"{name} must be a mapping with 'until' and 'shape', got {phase!r}.")
        unknown = set(phase) - {"until", "shape", "to", "value"}
        if unknown:
            key = sorted(unknown)[0]
            raise ValueError(f"{name} has unknown key {key!r}.{v.closest(key, ['until', 'shape', 'to', 'value'])}")
        v.check_positive(f"{name}.until", phase.get("until"))
        if not previous < phase["until"] <= 1.0:
            raise ValueError(
                f"{name}.until must increase and be <= 1.0 (a fraction of training), got {phase['until']}."
            )
        previous = phase["until"]
        shape = phase.get("shape", "constant")
        v.check_choice(f"{name}.shape", shape, ("constant", "cosine", "linear"))
        if shape != "constant":
            v.check_non_negative(f"{name}.to", phase.get("to"))
        elif "value" in phase:
            v.check_non_negative(f"{name}.value", phase["value"])


#: name -> (function, parameters the caller may set besides num_warmup_steps / num_training_steps)
SCHEDULES: dict[str, tuple[Callable[..., float], tuple[str, ...]]] = {
    "cosine_to_floor": (cosine_to_floor, ("floor", "decay_steps")),
    "linear_to_floor": (linear_to_floor, ("floor", "decay_steps")),
    "inverse_sqrt_max": (inverse_sqrt_max, ("plateau_steps",)),
    "step_decay": (step_decay, ("milestones", "factors")),
    "phases": (phases, ("phases",)),
}


def make_multiplier(name: str, *, num_training_steps: int, num_warmup_steps: int = 0, **params: Any) -> Multiplier:
    """Validate the parameters of schedule ``name`` and return ``η(k)`` (a picklable ``functools.partial``)."""
    v.check_choice("schedule", name, tuple(SCHEDULES))
    func, allowed = SCHEDULES[name]
    for key in params:
        if key not in allowed:
            raise ValueError(
                f"schedule {name!r} has no parameter {key!r}; allowed: {list(allowed)}.{v.closest(key, allowed)}"
            )
    for arg, value in (("num_training_steps", num_training_steps), ("num_warmup_steps", num_warmup_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{arg} must be an integer >= 0, got {value!r}.")
    kwargs: dict[str, Any] = {"num_warmup_steps": num_warmup_steps}
    if name in ("cosine_to_floor", "linear_to_floor"):
        floor = params.get("floor", 0.0)
        v.check_non_negative("floor", floor)
        if floor > 1:
            raise ValueError(f"floor is a fraction of the peak lr and must be in [0, 1], got {floor!r}.")
        decay_steps = params.get("decay_steps", num_training_steps)
        if isinstance(decay_steps, bool) or not isinstance(decay_steps, int) or decay_steps < 0:
            raise ValueError(f"decay_steps must be an integer >= 0, got {decay_steps!r}.")
        kwargs.update(floor=float(floor), decay_steps=decay_steps)
    elif name == "inverse_sqrt_max":
        plateau = params.get("plateau_steps", 10_000)
        if isinstance(plateau, bool) or not isinstance(plateau, int) or plateau < 1:
            raise ValueError(f"plateau_steps must be an integer >= 1, got {plateau!r}.")
        kwargs.update(plateau_steps=plateau)
    elif name == "step_decay":
        milestones, factors = list(params.get("milestones", [])), list(params.get("factors", []))
        if len(milestones) != len(factors) or not milestones:
            raise ValueError(
                f"step_decay needs equally long non-empty milestones and factors, got {milestones!r} and {factors!r}."
            )
        for i, (m, f) in enumerate(zip(milestones, factors)):
            v.check_unit_interval(f"milestones[{i}]", m)
            v.check_non_negative(f"factors[{i}]", f)
        kwargs.update(num_training_steps=num_training_steps, milestones=milestones, factors=factors)
    else:
        _check_phases(params.get("phases"))
        kwargs.update(num_training_steps=num_training_steps, spec=[dict(p) for p in params["phases"]])
    return partial(func, **kwargs)


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str,
    *,
    num_training_steps: int,
    num_warmup_steps: int = 0,
    last_epoch: int = -1,
    **params: Any,
) -> LambdaLR:
    """A ``LambdaLR`` applying schedule ``name`` to every group of ``optimizer`` (see the module table)."""
    multiplier = make_multiplier(
        name, num_training_steps=num_training_steps, num_warmup_steps=num_warmup_steps, **params
    )
    return LambdaLR(optimizer, multiplier, last_epoch=last_epoch)
