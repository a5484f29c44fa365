r"""Fit a recipe's lr schedule to the run's length (``run.max_steps``): compress it, or keep it absolute and say so.

A published schedule is written for the paper's run: LLaMA-2 warms up for 2000 of its 500k steps (2T tokens at 4M
per step). A 60-step run that keeps those 2000 steps never leaves the warm-up: its highest lr is 3% of the peak it
printed, and it learns nothing. So by default (``schedule.scale: true``) every step count of the schedule is
multiplied by

.. math:: f = T / H \quad (T = \texttt{run.max\_steps},\; H = \text{the recipe's horizon}),\qquad f < 1

(``num_warmup_steps``, ``decay_steps``, ``plateau_steps``; schedules stated as fractions of the run, ``step_decay``
and ``phases``, already follow T). The shape is preserved: the warm-up keeps its share of the run (0.4 % for
LLaMA-2), the floor and every ratio stay. :math:`H` is the recipe file's own ``run.max_steps`` (a demo written for
its 300 steps), else the published run's steps (``training.total_steps``, or total tokens / batch tokens). A run at
least as long as :math:`H` is not stretched. Step counts set on the command line (``schedule.warmup_steps=20``) are
the run's own and are never scaled.

``schedule.scale: false`` keeps the published step counts; the run then warns when it cannot reach its peak lr.
Either way the peak lr a run *reaches*, :math:`\eta_{\max} \cdot \max_{0 \le k < T} \eta(k)`, is what is reported.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from . import build
from .schedules import make_multiplier

#: Schedule keywords that count optimizer steps (``make_multiplier`` arguments), scaled by ``T / H``.
STEP_KEYS = ("num_warmup_steps", "decay_steps", "plateau_steps")
#: Recipe fields (command-line overrides) that set each of those in the run's own steps.
_OVERRIDE_FIELDS = {
    "num_warmup_steps": ("schedule.warmup_steps", "schedule.warmup_tokens", "schedule.warmup_fraction", "warmup_steps"),
    "decay_steps": ("schedule.decay_steps", "schedule.decay_tokens", "decay_steps"),
    "plateau_steps": ("schedule.plateau_steps",),
}
#: Beyond this many steps the reached peak is taken over a strided subset (it is a max of a cheap Python function).
_PEAK_SCAN_LIMIT = 1_000_000


@dataclass
class Fit:
    """How the schedule was fitted to the run: what :func:`fit` decided, for the log line and ``metrics.json``."""

    schedule: str
    run_steps: int
    recipe_horizon: int | None
    scale: bool  # schedule.scale (True = compress to the run)
    factor: float  # T / H applied to the recipe's step counts (1.0 = unchanged)
    steps: dict[str, list[int]] = field(default_factory=dict)  # key -> [recipe value, run value]
    kwargs: dict[str, Any] = field(default_factory=dict)  # make_multiplier(name, **kwargs) for this run
    peak_multiplier: float = 1.0  # max_k eta(k) over the run
    peak_step: int = 0

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("kwargs")
        return data

    def announcement(self) -> str | None:
        """One line when the schedule differs from the recipe's, else ``None``."""
        changed = {k: v for k, v in self.steps.items() if v[0] != v[1]}
        if self.factor == 1.0 or not changed:
            return None
        what = ", ".join(f"{_LABELS[k]} {a} -> {b}" for k, (a, b) in changed.items())
        return (
            f"schedule compressed to this run: {what} steps (x{self.factor:.3g} = run.max_steps {self.run_steps} / "
            f"recipe horizon {self.recipe_horizon}; schedule.scale=false keeps the recipe's steps)"
        )

    def warning(self, peak_lr: float | None) -> str | None:
        """A warning when the run cannot reach its peak lr (e.g. ``schedule.scale=false`` with a long warm-up)."""
        if self.peak_multiplier >= 0.999:
            return None
        warmup = self.kwargs.get("num_warmup_steps", 0)
        why = (
            f"its warm-up is {warmup} steps and the run has {self.run_steps}"
            if warmup >= self.run_steps
            else "the schedule does not reach its peak within the run"
        )
        reached = (
            f"{peak_lr * self.peak_multiplier:.3g} of peak lr {peak_lr:.3g}"
            if peak_lr is not None
            else f"{self.peak_multiplier:.1%} of the peak lr"
        )
        hint = (
            "; remove schedule.scale=false to compress the schedule to the run, or set schedule.warmup_steps"
            if not self.scale
            else "; set schedule.warmup_steps (in this run's steps)"
        )
        return f"this run reaches only {reached} ({self.peak_multiplier:.1%}): {why}{hint}."


_LABELS = {"num_warmup_steps": "warm-up", "decay_steps": "decay", "plateau_steps": "plateau"}


def recipe_horizon(recipe: Mapping[str, Any], size: str | None, file_max_steps: int | None) -> int | None:
    """The run length the recipe's schedule was written for: its own ``run.max_steps``, else the published run's."""
    if file_max_steps:
        return int(file_max_steps)
    return build.published_num_steps(recipe, size)


def fixed_keys(overrides: Iterable[str]) -> set[str]:
    """Schedule keywords set on the command line (``section.key=value``): those are in the run's steps already."""
    fields = {text.partition("=")[0] for text in overrides}
    fixed = set()
    for key, names in _OVERRIDE_FIELDS.items():
        for name in names:
            if name in fields or (
                name.count(".") == 0 and any(f.startswith("sizes.") and f.endswith("." + name) for f in fields)
            ):
                fixed.add(key)
    return fixed


def fit(
    recipe: Mapping[str, Any],
    run_steps: int,
    *,
    size: str | None = None,
    horizon: int | None = None,
    fixed: Iterable[str] = (),
) -> Fit:
    """Resolve the schedule for a run of ``run_steps`` steps (see the module docstring); raises ``ValueError``."""
    scale = (recipe.get("schedule") or {}).get("scale")
    scale = True if scale is None else bool(scale)
    name, run_kwargs = build.schedule_kwargs(recipe, run_steps, size)
    result = Fit(schedule=name, run_steps=run_steps, recipe_horizon=horizon, scale=scale, factor=1.0)
    if scale and horizon and run_steps < horizon:
        _, recipe_kwargs = build.schedule_kwargs(recipe, horizon, size)
        result.factor = run_steps / horizon
        for key in STEP_KEYS:
            if key not in recipe_kwargs or key in fixed:
                continue
            if key == "decay_steps" and "decay_steps" not in run_kwargs:
                continue  # not stated: it defaults to num_training_steps, i.e. already the run's length
            original = int(recipe_kwargs[key])
            scaled = round(original * result.factor)
            if key == "plateau_steps":
                scaled = max(1, scaled)
            run_kwargs[key] = scaled
            result.steps[key] = [original, scaled]
    for key in STEP_KEYS:
        if key in run_kwargs and key not in result.steps:
            result.steps[key] = [int(run_kwargs[key])] * 2
    multiplier = make_multiplier(name, **run_kwargs)
    result.kwargs = run_kwargs
    result.peak_multiplier, result.peak_step = _peak(multiplier, run_steps)
    return result


def _peak(multiplier, run_steps: int) -> tuple[float, int]:
    """``max_k eta(k)`` over the run's updates ``k = 0 .. T-1`` (LambdaLR's count) and the first step reaching it."""
    stride = max(1, run_steps // _PEAK_SCAN_LIMIT)
    best, best_step = float("-inf"), 0
    for k in range(0, run_steps, stride):
        value = multiplier(k)
        if value > best:
            best, best_step = value, k
    return best, best_step
