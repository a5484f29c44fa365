r"""State dicts of the optimizers people already have: torch's and transformers' classes that an hf-optim class
reproduces, translated into hf-optim's format so that a run can switch optimizer class without losing its moments.

A *format* is recognised by the knob names in its ``param_groups`` (torch groups hold torch knobs only: no
``weight_decay_mode``, ``implementation`` or ``lr_peak``) and translated in two parts:

* **group**: the knobs the saved dict defines are mapped onto hf-optim knobs with the same meaning (torch
  ``AdamW(weight_decay=λ)`` is ``weight_decay_mode="coupled"``, torch ``SGD(weight_decay=λ)`` is ``"l2"``,
  ``Adafactor(beta2_decay=-0.8)`` is ``decay_rate=0.8``, ...); a knob the saved dict does not define keeps the live
  optimizer's value (``implementation``, ``lr_peak``, ``stochastic_rounding``);
* **state**: per-parameter entries renamed or reshaped where the names or layouts differ (torch Adafactor keeps
  ``row_var`` of shape ``(..., R, 1)`` where hf-optim keeps ``exp_avg_sq_row`` of shape ``(..., R)``; transformers'
  Adafactor counts ``step`` as a Python int and caches ``RMS``).

The translated dict is then checked like any other (:mod:`hf_optim._state_loading`). Formats a class accepts are
listed in its ``interop_formats``. The continuations are tested against the original classes in
``tests/test_torch_interop.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch

from . import precision
from .optim.adafactor.presets import PRESETS

#: Group keys that torch's schedulers, SWA and named parameters add: kept as saved.
PASSTHROUGH: frozenset[str] = frozenset(
    {"params", "param_names", "initial_lr", "max_lr", "min_lr", "base_momentum", "max_momentum", "swa_lr"}
)
#: Keys only hf-optim groups have: their presence means the dict was saved by an hf-optim class.
NATIVE_MARKERS: frozenset[str] = frozenset({"lr_peak", "implementation", "weight_decay_mode"})

GroupFn = Callable[[Mapping[str, Any], Mapping[str, Any]], dict[str, Any]]
StateFn = Callable[[dict[str, Any]], dict[str, Any]]


class Format(NamedTuple):
    """A foreign state-dict format: how to recognise its groups and how to translate them."""

    source: str  # e.g. "torch.optim.AdamW"
    required: frozenset[str]  # group keys it always has
    forbidden: frozenset[str]  # group keys of look-alike classes it never has
    group: GroupFn  # (saved group, live group) -> the hf-optim knobs the saved group defines
    state: StateFn  # one parameter's saved state -> hf-optim state

    def matches(self, keys: set[str]) -> bool:
        return self.required <= keys and not (self.forbidden & keys)


def _float(value: Any) -> Any:
    """torch allows 0-d tensors as lr / betas; hf-optim groups hold plain numbers."""
    return value.item() if torch.is_tensor(value) and value.numel() == 1 else value


def _host_step(state: dict[str, Any]) -> dict[str, Any]:
    """hf-optim keeps ``step`` as a float32 0-d CPU tensor (torch's fused/capturable paths keep it on the device)."""
    state = dict(state)
    if "step" in state:
        step = state["step"]
        if torch.is_tensor(step) and step.numel() == 1:
            state["step"] = precision.as_step(step.detach().to("cpu"))
        elif isinstance(step, (int, float)):
            state["step"] = precision.as_step(float(step))
        # anything else is refused by the checks that follow
    return state


def _l2_or_decoupled(saved: Mapping[str, Any], live: Mapping[str, Any]) -> str:
    """torch >= 2.8 writes ``decoupled_weight_decay`` in Adam/AdamW/RAdam/NAdam groups; older dicts lack it (then the
    live optimizer's mode stands)."""
    if "decoupled_weight_decay" not in saved:
        return live["weight_decay_mode"]
    return "coupled" if saved["decoupled_weight_decay"] else "l2"


def _adam_group(saved: Mapping[str, Any], live: Mapping[str, Any]) -> dict[str, Any]:
    if saved.get("amsgrad"):
        raise ValueError(
            "the saved torch optimizer ran with amsgrad=True; hf-optim has no AMSGrad (its max_exp_avg_sq state has "
            "no counterpart), so continuing would change the update. Continue with torch.optim.Adam(amsgrad=True)."
        )
    betas = tuple(_float(b) for b in saved["betas"])
    return {
        "lr": _float(saved["lr"]),
        "betas": betas,
        "eps": saved["eps"],
        "weight_decay": saved["weight_decay"],
        "weight_decay_mode": _l2_or_decoupled(saved, live),
        "eps_mode": "torch",
        "maximize": saved.get("maximize", False),
    }


def _radam_group(saved: Mapping[str, Any], live: Mapping[str, Any]) -> dict[str, Any]:
    # torch.optim.RAdam adds eps to the un-corrected sqrt(v): hf-optim's eps_mode="tf" (RAdam's default).
    return {**_adam_group(saved, live), "eps_mode": "tf"}


def _l2_group(saved: Mapping[str, Any], *knobs: str) -> dict[str, Any]:
    """torch's SGD, Adagrad and RMSprop: ``knobs`` carry over as saved, and their ``weight_decay`` is an L2 term."""
    return {
        "lr": _float(saved["lr"]),
        **{knob: saved[knob] for knob in knobs},
        "weight_decay": saved["weight_decay"],
        "weight_decay_mode": "l2",
        "maximize": saved.get("maximize", False),
    }


def _sgd_group(saved: Mapping[str, Any], live: Mapping[str, Any]) -> dict[str, Any]:
    return _l2_group(saved, "momentum", "dampening", "nesterov")


def _adagrad_group(saved: Mapping[str, Any], live: Mapping[str, Any]) -> dict[str, Any]:
    return _l2_group(saved, "lr_decay", "eps", "initial_accumulator_value")


def _rmsprop_group(saved: Mapping[str, Any], live: Mapping[str, Any]) -> dict[str, Any]:
    return _l2_group(saved, "alpha", "eps", "momentum", "centered")


#: Adafactor knobs that are not part of the maths a saved dict defines: they keep the live optimizer's values.
_ADAFACTOR_LIVE_KNOBS = ("implementation", "stochastic_rounding")


def _adafactor_preset(name: str, live: Mapping[str, Any]) -> dict[str, Any]:
    knobs = {k: v for k, v in PRESETS[name].items() if k not in _ADAFACTOR_LIVE_KNOBS}
    return {**knobs, "preset": name}


def _pair(value: Any, what: str) -> tuple[Any, Any]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"the saved {what} group's eps must be a pair (eps1, eps2), got {value!r}.")
    return value[0], value[1]


def _torch_adafactor_group(saved: Mapping[str, Any], live: Mapping[str, Any]) -> dict[str, Any]:
    eps1, eps2 = _pair(saved["eps"], "torch.optim.Adafactor")
    return {
        **_adafactor_preset("torch", live),
        "lr": _float(saved["lr"]),
        "decay_rate": -saved["beta2_decay"],
        "eps1": eps1,
        "eps2": eps2,
        "clip_threshold": saved["d"],
        "weight_decay": saved["weight_decay"],
        "maximize": saved.get("maximize", False),
    }


def _transformers_adafactor_group(saved: Mapping[str, Any], live: Mapping[str, Any]) -> dict[str, Any]:
    eps1, eps2 = _pair(saved["eps"], "transformers Adafactor")
    relative = saved["relative_step"]
    # transformers ignores lr under relative_step (rho_t = min(1e-2, 1/sqrt(t))): hf-optim's lr multiplies rho_t.
    lr = 1.0 if relative else _float(saved["lr"])
    if lr is None:
        raise ValueError("the saved transformers Adafactor group has lr=None with relative_step=False.")
    return {
        **_adafactor_preset("hf", live),
        "lr": lr,
        "decay_rate": -saved["decay_rate"],
        "eps1": eps1,
        "eps2": eps2,
        "clip_threshold": saved["clip_threshold"],
        "beta1": saved["beta1"],
        "weight_decay": saved["weight_decay"],
        "scale_parameter": saved["scale_parameter"],
        "relative_step": relative,
        "warmup_init": saved["warmup_init"],
    }


#: torch.optim.Muon's ``adjust_lr_fn`` -> hf-optim's ``adjust``.
_TORCH_MUON_ADJUST = {None: "original", "original": "original", "match_rms_adamw": "rms"}


def _torch_muon_group(saved: Mapping[str, Any], live: Mapping[str, Any]) -> dict[str, Any]:
    adjust = saved["adjust_lr_fn"]
    if adjust not in _TORCH_MUON_ADJUST:
        raise ValueError(
            f"the saved torch.optim.Muon group has adjust_lr_fn={adjust!r}; hf_optim.Muon maps "
            f"{sorted(map(str, _TORCH_MUON_ADJUST))} onto its adjust."
        )
    return {
        "lr": _float(saved["lr"]),
        "weight_decay": saved["weight_decay"],
        "weight_decay_mode": "coupled",  # torch.optim.Muon: p *= 1 - lr * weight_decay
        "momentum": saved["momentum"],
        "nesterov": saved["nesterov"],
        "ns_coefficients": tuple(saved["ns_coefficients"]),
        "ns_steps": saved["ns_steps"],
        "ns_dtype": "bfloat16",
        "orthogonalize": "newton_schulz",
        "eps": saved["eps"],
        "adjust": _TORCH_MUON_ADJUST[adjust],
        "rule": "muon",
    }


def _squeezed(t: Any, dim: int) -> Any:
    return t.squeeze(dim) if torch.is_tensor(t) and t.dim() >= 2 and t.shape[dim] == 1 else t


def _torch_adafactor_state(state: dict[str, Any]) -> dict[str, Any]:
    """``row_var`` (..., R, 1) / ``col_var`` (..., 1, C) / ``variance`` -> hf-optim's names and shapes."""
    out = _host_step(state)
    names = {"row_var": "exp_avg_sq_row", "col_var": "exp_avg_sq_col", "variance": "exp_avg_sq"}
    for old, new in names.items():
        if old in out:
            value = out.pop(old)
            out[new] = _squeezed(value, -1) if old == "row_var" else _squeezed(value, -2) if old == "col_var" else value
    return out


def _transformers_adafactor_state(state: dict[str, Any]) -> dict[str, Any]:
    out = _host_step(state)
    out.pop("RMS", None)  # a cache of RMS(x), recomputed every step
    return out


def _keys(*names: str) -> frozenset[str]:
    return frozenset(names)


FORMATS: dict[str, Format] = {
    "torch.optim.Adam/AdamW": Format(
        "torch.optim.Adam/AdamW",
        _keys("betas", "eps", "amsgrad"),
        _keys("momentum_decay", *NATIVE_MARKERS),
        _adam_group,
        _host_step,
    ),
    "torch.optim.RAdam": Format(
        "torch.optim.RAdam",
        _keys("betas", "eps", "decoupled_weight_decay"),
        _keys("amsgrad", "momentum_decay", *NATIVE_MARKERS),
        _radam_group,
        _host_step,
    ),
    "torch.optim.SGD": Format(
        "torch.optim.SGD", _keys("momentum", "dampening", "nesterov"), NATIVE_MARKERS, _sgd_group, _host_step
    ),
    "torch.optim.Adagrad": Format(
        "torch.optim.Adagrad",
        _keys("lr_decay", "initial_accumulator_value", "eps"),
        NATIVE_MARKERS,
        _adagrad_group,
        _host_step,
    ),
    "torch.optim.RMSprop": Format(
        "torch.optim.RMSprop", _keys("alpha", "centered", "momentum", "eps"), NATIVE_MARKERS, _rmsprop_group, _host_step
    ),
    "torch.optim.Muon": Format(
        "torch.optim.Muon",
        _keys("ns_coefficients", "ns_steps", "adjust_lr_fn"),
        NATIVE_MARKERS,
        _torch_muon_group,
        _host_step,
    ),
    "torch.optim.Adafactor": Format(
        "torch.optim.Adafactor",
        _keys("beta2_decay", "d", "eps"),
        NATIVE_MARKERS,
        _torch_adafactor_group,
        _torch_adafactor_state,
    ),
    "transformers Adafactor": Format(
        "transformers Adafactor",
        _keys("clip_threshold", "decay_rate", "scale_parameter", "relative_step", "warmup_init"),
        NATIVE_MARKERS,
        _transformers_adafactor_group,
        _transformers_adafactor_state,
    ),
}


def find_format(keys: set[str], accepted: tuple[str, ...] | None = None) -> Format | None:
    """The first format (of ``accepted``, or of all) whose groups have these keys."""
    for name in accepted if accepted is not None else tuple(FORMATS):
        if FORMATS[name].matches(keys):
            return FORMATS[name]
    return None
