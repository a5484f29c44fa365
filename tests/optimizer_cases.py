"""The central table of optimizer configurations.

Generic tests (invariants, state_dict round trip, bf16, bad hyperparameters, fast path == for-loop) run over every
row. The rows are generated as the cross product optimizer x ``weight_decay_mode`` (x ``eps_mode`` for the Adam
family that has one; x ``preset`` for Adafactor), so no combination is left out. Adding an optimizer = one entry in
``FAMILIES``; adding a mode = one entry in ``DECAY``.

Per-mode λ: the value each mode is used with in practice (``independent`` λ is not multiplied by the lr, so ~1e-4),
large enough for the decay to change the trajectory of the invariant tests.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

import hf_optim

#: weight_decay_mode -> λ used in that mode's rows.
DECAY: dict[str, float] = {"l2": 1e-2, "coupled": 1e-1, "independent": 1e-4, "corrected": 1e-2}
MODES = tuple(DECAY)
EPS_MODES = ("torch", "tf")


@dataclass(frozen=True)
class Case:
    id: str
    cls_name: str  # attribute of the hf_optim package, or "module:Class" of an optimizer defined elsewhere
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def cls(self) -> type:
        if ":" in self.cls_name:
            module, _, attr = self.cls_name.partition(":")
            return getattr(importlib.import_module(module), attr)
        return getattr(hf_optim, self.cls_name)

    @property
    def available(self) -> bool:
        """False while the row's module is not written yet (its tests then fail, as they should)."""
        try:
            return isinstance(self.cls, type)
        except (ImportError, AttributeError):
            return False

    def build(self, params, **overrides: Any):
        return self.cls(params, **{**self.kwargs, **overrides})


def _adam_family() -> list[Case]:
    rows = []
    for cls in ("Adam", "AdamW", "RAdam"):
        for mode in MODES:
            for eps_mode in EPS_MODES:
                kwargs = dict(
                    lr=1e-2,
                    weight_decay=DECAY[mode],
                    weight_decay_mode=mode,
                    eps_mode=eps_mode,
                    eps=1e-7 if eps_mode == "tf" else 1e-8,
                )
                rows.append(Case(f"{cls.lower()}-{mode}-{eps_mode}", cls, kwargs))
    for mode in MODES:  # no epsilon: b varies with the mode so b != 1 (and the b = 0 sign step) are covered
        b = {"l2": 1.0, "coupled": 1.0, "independent": 2.0, "corrected": 0.0}[mode]
        rows.append(
            Case(f"adamatan2-{mode}", "AdamAtan2", dict(lr=1e-2, weight_decay=DECAY[mode], weight_decay_mode=mode, b=b))
        )
    return rows


# Each mode of the element-wise optimizers is paired with a different variant, so every variant and every mode
# appear (the decay must not depend on the variant; the variants are checked against torch in their own tests).
_ELEMENTWISE_VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "SGDW": {
        "l2": dict(momentum=0.9),
        "coupled": dict(momentum=0.9, nesterov=True),
        "independent": dict(momentum=0.8, dampening=0.1),
        "corrected": dict(momentum=0.0, maximize=True),
    },
    "AdaGrad": {
        "l2": dict(),
        "coupled": dict(lr_decay=1e-2, initial_accumulator_value=0.1),
        "independent": dict(lr_decay=1e-2),
        "corrected": dict(initial_accumulator_value=0.1, maximize=True),
    },
    "RMSProp": {
        "l2": dict(momentum=0.9, centered=True),
        "coupled": dict(),
        "independent": dict(centered=True, alpha=0.9),
        "corrected": dict(momentum=0.5, maximize=True),
    },
}


def _elementwise() -> list[Case]:
    lrs = {"SGDW": 1e-2, "AdaGrad": 1e-2, "RMSProp": 1e-3}
    return [
        Case(
            f"{cls.lower()}-{mode}",
            cls,
            dict(lr=lrs[cls], weight_decay=DECAY[mode], weight_decay_mode=mode, **_ELEMENTWISE_VARIANTS[cls][mode]),
        )
        for cls in _ELEMENTWISE_VARIANTS
        for mode in MODES
    ]


# lr per preset: relative-step presets take a multiplier (1.0 = transformers' lr=None); torch's is the cap.
_ADAFACTOR_LR = {"adafactor_v2": 1e-2, "hf": 1.0, "torch": 1e-2, "palm": 1e-2, "t5": 1.0}


def _adafactor() -> list[Case]:
    rows = []
    for preset, lr in _ADAFACTOR_LR.items():
        for mode in MODES:
            kwargs: dict[str, Any] = dict(lr=lr, preset=preset, weight_decay_mode=mode, weight_decay=DECAY[mode])
            if preset == "palm" and mode == "corrected":
                del kwargs["weight_decay"]  # the preset's own λ = "lr" (lr_t² decay)
            if preset in ("adafactor_v2", "t5"):
                # Their default (128) would leave the small test matrices unfactored; 2 factors 6x4 and 2x3x2.
                kwargs["min_dim_size_to_factor"] = 2
            rows.append(Case(f"adafactor-{preset}-{mode}", "Adafactor", kwargs))
    return rows


# Muon: each mode with another adjust / momentum variant; the test tensors' matrices go to Muon, vectors to the
# fallback (rule="auto"), so both rules of the one object run through every invariant.
_MUON_VARIANTS: dict[str, dict[str, Any]] = {
    "l2": dict(adjust="original"),
    "coupled": dict(adjust="rms", nesterov=False),
    "independent": dict(adjust="spectral", ns_dtype="float32"),
    "corrected": dict(adjust="original", fallback="adafactor_v2", orthogonalize="svd"),
}


def _muon() -> list[Case]:
    return [
        Case(
            f"muon-{mode}",
            "Muon",
            dict(lr=1e-2, weight_decay=DECAY[mode], weight_decay_mode=mode, **_MUON_VARIANTS[mode]),
        )
        for mode in MODES
    ]


#: An optimizer defined outside the package (tests/toy_optimizer.py): its one row.
_TOY = [
    Case(
        "toy-signum-independent",
        "toy_optimizer:Signum",
        dict(lr=1e-2, weight_decay=1e-4, weight_decay_mode="independent"),
    )
]

_BASE_CASES: list[Case] = [*_adam_family(), *_elementwise(), *_adafactor(), *_muon(), *_TOY]

#: Stored state (``state_dtype``): each class's first row, and Adafactor's hf preset (fp32 momentum), in every stored
#: form. Blocks of 4 and no size threshold, so the test tensors (6x4, 5, 2x3x2, a scalar) are quantised too.
STATE_DTYPES = ("bfloat16", "int8", "int4")


def _stored_state() -> list[Case]:
    # hf_optim's own classes; centred RMSProp refuses a stored state (its variance is a difference of two statistics)
    firsts = {c.cls_name: c for c in reversed(_BASE_CASES) if ":" not in c.cls_name and not c.kwargs.get("centered")}
    picked = [*firsts.values(), next(c for c in _BASE_CASES if c.id == "adafactor-hf-coupled")]
    return [
        Case(
            f"{case.id}-{dtype}",
            case.cls_name,
            {**case.kwargs, "state_dtype": dtype, "state_block_size": 4, "state_min_numel": 1},
        )
        for case in picked
        for dtype in STATE_DTYPES
    ]


CASES: list[Case] = [*_BASE_CASES, *_stored_state()]

CASE_IDS = [case.id for case in CASES]
