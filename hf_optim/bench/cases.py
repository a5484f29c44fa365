"""What ``hf-optim bench`` measures: :class:`BenchCase` (a named optimizer constructor) and the case lists, the
reference (fused ``torch.optim.AdamW``), torch's and transformers' yardsticks and every registered optimizer with its
modes, presets and implementations. Timing them is :mod:`hf_optim.bench`'s job.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

REFERENCE = "torch_adamw_fused"


@dataclass(frozen=True)
class BenchCase:
    """One optimizer configuration: ``build(params)`` returns a ``torch.optim.Optimizer``."""

    name: str
    build: Callable[[list[torch.Tensor]], torch.optim.Optimizer]
    grad_reads: int = 1  # how many times the rule must stream the gradient (byte model)
    kwargs: dict[str, Any] = field(default_factory=dict)


#: Short names for knobs in case names (``adamw_v2[coupled,wd=0.1,eps=tf]/fused``); a value alone for modes/presets.
_LABELS = {
    "weight_decay_mode": "",
    "preset": "",
    "weight_decay": "wd=",
    "eps_mode": "eps=",
    "beta1": "beta1=",
    "momentum_dtype": "m=",
    "state_dtype": "state=",
}
#: Stored state forms benchmarked (``auto`` implementation) for the optimizers whose state dominates memory.
STATE_DTYPES = ("bfloat16", "int8", "int4")


def _ours(spec_name: str, implementation: str, grad_reads: int = 1, **kwargs: Any) -> BenchCase:
    from ..registry import get_spec

    spec = get_spec(spec_name)
    full = {**spec.defaults, **kwargs, "implementation": implementation}
    label = ",".join(f"{_LABELS.get(k, k + '=')}{v}" for k, v in kwargs.items())
    name = f"{spec_name}[{label}]/{implementation}" if label else f"{spec_name}/{implementation}"
    return BenchCase(name, lambda params: spec.resolve()(params, **full), grad_reads, full)


def _implementations(spec_name: str) -> tuple[str, ...]:
    from ..registry import get_spec

    try:
        return ("auto", *get_spec(spec_name).resolve().implementations)
    except Exception:  # a module not written yet still gets a (missing) row
        return ("auto",)


def reference_cases() -> list[BenchCase]:
    """torch's and transformers' optimizers, the yardsticks."""

    def hf_adafactor(params: list[torch.Tensor]) -> torch.optim.Optimizer:
        from transformers.optimization import Adafactor

        # The Trainer's configuration for `--optim adafactor`.
        return Adafactor(params, lr=1e-3, relative_step=False, scale_parameter=False, warmup_init=False)

    return [
        BenchCase(REFERENCE, lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.1, fused=True), 1, {"fused": True}),
        BenchCase(
            "torch_adamw_foreach",
            lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.1, foreach=True),
            1,
            {"foreach": True},
        ),
        BenchCase(
            "torch_adafactor_foreach", lambda p: torch.optim.Adafactor(p, lr=1e-2, foreach=True), 2, {"foreach": True}
        ),
        BenchCase("hf_adafactor", hf_adafactor, 2, {"relative_step": False, "scale_parameter": False}),
    ]


def our_cases() -> list[BenchCase]:
    """Every registered optimizer, the Adam weight-decay × eps modes, the Adafactor presets, every implementation."""
    from ..registry import list_optimizers

    wd_for_mode = {"l2": 0.1, "coupled": 0.1, "independent": 1e-4, "corrected": 0.1}
    cases: list[BenchCase] = []
    for spec in list_optimizers():
        for impl in _implementations(spec.name):
            if spec.name in ("adamw_v2", "adam_v2"):
                for mode, wd in wd_for_mode.items():
                    for eps_mode in ("torch", "tf"):
                        cases.append(_ours(spec.name, impl, weight_decay_mode=mode, weight_decay=wd, eps_mode=eps_mode))
            elif "adafactor" in spec.name:
                for preset in ("adafactor_v2", "hf", "torch", "palm", "t5"):
                    cases.append(_ours(spec.name, impl, 2, preset=preset))
                cases.append(_ours(spec.name, impl, 2, preset="adafactor_v2", beta1=None))
                cases.append(_ours(spec.name, impl, 2, preset="adafactor_v2", momentum_dtype="float32"))
                cases.append(_ours(spec.name, impl, 2, preset="hf", beta1=0.9))
            else:
                cases.append(_ours(spec.name, impl))
        if spec.name in ("adamw_v2", "adafactor_v2", "muon_v2"):
            grad_reads = 2 if "adafactor" in spec.name else 1
            cases += [_ours(spec.name, "auto", grad_reads, state_dtype=dtype) for dtype in STATE_DTYPES]
    return cases


def all_cases() -> list[BenchCase]:
    return reference_cases() + our_cases()
