r"""Adafactor presets as plain data: every knob of :class:`hf_optim.optim.adafactor.optimizer.Adafactor`, per known
variant.

A preset is a complete dict of knob values; a knob passed to the constructor overrides the preset, and the resolved
values are stored in each parameter group (plain Python values, so ``state_dict()`` round-trips).

``adafactor_v2`` (our default) follows the "big_vision" / Scaling-ViT recipe (Zhai et al. 2021, *Scaling Vision
Transformers*, sec. 3.4 and ``big_vision.optax.scale_by_adafactor``), which later LLM practice converged on:

* ``beta1 = 0.9`` momentum stored in **bfloat16** (2 bytes/param; the ViT paper reports no loss from the lower
  precision), applied to the clipped, *un-scaled* update so that the learning rate (and its schedule) multiplies the
  averaged direction, as in Adam/optax (``momentum_before_lr=True``);
* ``beta2_t = min(0.999, 1 - t^{-0.8})``: the paper's increasing decay, capped so that the second moment keeps a
  ~1000-step memory (uncapped, ``1 - beta2_t`` falls below 1e-4 after 100k steps and the statistics stop tracking
  shifts in the gradient scale);
* update clipping at ``d = 1`` (Shazeer & Stern 2018, sec. 6), which replaces Adam's warm-up bias problems;
* **no** parameter scaling and **no** relative step: the learning rate is the learning rate, so the Trainer's
  schedulers and muP's per-layer multipliers mean the same thing as for AdamW;
* factor only the two **largest** dims, and only when both are ``>= 128`` (optax/Mesh-TF ``min_dim_size_to_factor``):
  small matrices cost little unfactored and factoring e.g. a 3-wide conv kernel dim is a poor approximation;
* weight decay ``independent`` (``x *= 1 - (lr_t/lr_peak)·λ``, as big_vision's ``wd * sched_fn(step)``): the decay
  per step follows the schedule but does not move when the peak lr is tuned. Default λ = 0 (set it, e.g. 1e-4).
* ``eps1 = 1e-30`` added to ``g²`` (paper, optax), ``eps2 = 1e-3`` (only used with parameter scaling).

Sources of the other presets:

* ``hf``: ``transformers.optimization.Adafactor`` (a port of fairseq's, itself of tensor2tensor's) with its defaults
  (relative step, parameter scaling on). It factors every tensor with ``ndim >= 2`` over its last two dims, adds eps1 to
  ``g²``, applies momentum to the clipped *and lr-scaled* update, decays by ``wd·α_t`` with ``α_t`` the effective step
  (relative step times parameter scale). The Trainer's stock ``adafactor`` uses ``relative_step=False,
  scale_parameter=False, lr=args.learning_rate``: pass those three knobs to reproduce it.
  Difference by design: with ``relative_step=True`` our ``lr`` *multiplies* ``ρ_t`` (use ``lr=1.0`` for transformers'
  ``lr=None``), so schedulers compose instead of crashing.
* ``torch``: ``torch.optim.Adafactor`` (torch >= 2.5): no momentum, ``ρ_t = min(lr, 1/sqrt(t))`` (the lr is the cap),
  parameter scaling always on, eps1 as a clamp (``max(mean R, eps1)`` and ``max(sqrt(V), eps1)``, with ``eps1=None``
  meaning the machine epsilon of the parameter dtype), decay ``x *= 1 - lr·λ`` with the group lr, and the two maxima
  ``max(1, RMS(U)/d)`` and ``max(eps2, RMS(x))`` taken with Python's ``max`` (``max_ignores_nan``: a NaN RMS gives
  the floor, so one NaN gradient entry of an unfactored tensor poisons that entry only, where the other presets
  poison the whole tensor, as transformers does).
* ``palm``: Chowdhery et al. 2022 (PaLM, sec. 5): Adafactor without factorization (≈ Adam with parameter scaling),
  ``β1 = 0.9``, ``β2 = 1 - k^{-0.8}`` (no cap), update clipping 1.0, lr 1e-2 (then ``1e-2·sqrt(1e4/k)`` from a
  scheduler), dynamic weight decay ``lr_t²`` = mode ``corrected`` with ``λ = lr_peak`` (``weight_decay="lr"`` below is
  resolved to the peak lr). Momentum follows the tensor2tensor/Lingvo lineage: applied after the lr scaling.
* ``t5``: Raffel et al. 2020 with Mesh-TensorFlow's Adafactor: factored (two largest dims, min 128), no momentum,
  parameter scaling, relative step ``min(1e-2, 1/sqrt(t))`` (= T5's ``1/sqrt(max(k, 1e4))``), ``β2 = 1 - t^{-0.8}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final

#: Resolved at construction to the peak learning rate (PaLM's ``lr²`` decay is ``corrected`` with λ = lr_peak).
WEIGHT_DECAY_IS_LR: Final[str] = "lr"

_ADAFACTOR_V2: dict[str, Any] = dict(
    lr=1e-3,
    factored=True,
    factor_dims="largest_two",
    min_dim_size_to_factor=128,
    beta1=0.9,
    momentum_dtype="bfloat16",
    momentum_before_lr=True,
    decay_rate=0.8,
    beta2_cap=0.999,
    eps1=1e-30,
    eps2=1e-3,
    eps1_mode="add",
    clip_threshold=1.0,
    max_ignores_nan=False,
    relative_step=False,
    rho_max=1e-2,
    relative_step_lr="multiplier",
    warmup_init=False,
    scale_parameter=False,
    weight_decay=0.0,
    weight_decay_mode="independent",
    weight_decay_lr="group",
    decay_as_factor=False,
    maximize=False,
    stochastic_rounding=False,
    implementation="auto",
    state_dtype="float32",
    state_block_size=256,
    state_min_numel=4096,
    param_update="nearest",
)

_PRESETS: dict[str, dict[str, Any]] = {
    "adafactor_v2": _ADAFACTOR_V2,
    "hf": {
        **_ADAFACTOR_V2,
        "lr": 1.0,
        "factor_dims": "last_two",
        "min_dim_size_to_factor": 1,
        "beta1": None,
        "momentum_dtype": "float32",
        "momentum_before_lr": False,
        "beta2_cap": None,
        "relative_step": True,
        "scale_parameter": True,
        "weight_decay_mode": "coupled",
        "weight_decay_lr": "step",
    },
    "torch": {
        **_ADAFACTOR_V2,
        "lr": 1e-2,
        "factor_dims": "last_two",
        "min_dim_size_to_factor": 1,
        "beta1": None,
        "momentum_dtype": "float32",
        "beta2_cap": None,
        "eps1": None,
        "eps1_mode": "clamp",
        "max_ignores_nan": True,
        "relative_step": True,
        "relative_step_lr": "cap",
        "scale_parameter": True,
        "weight_decay_mode": "coupled",
        "weight_decay_lr": "group",
        "decay_as_factor": True,
    },
    "palm": {
        **_ADAFACTOR_V2,
        "lr": 1e-2,
        "factored": False,
        "momentum_dtype": "float32",
        "momentum_before_lr": False,
        "beta2_cap": None,
        "scale_parameter": True,
        "weight_decay": WEIGHT_DECAY_IS_LR,
        "weight_decay_mode": "corrected",
    },
    "t5": {
        **_ADAFACTOR_V2,
        "lr": 1.0,
        "beta1": None,
        "momentum_dtype": "float32",
        "beta2_cap": None,
        "relative_step": True,
        "scale_parameter": True,
        "weight_decay_mode": "coupled",
    },
}

#: name -> complete, read-only knob dict.
PRESETS: Final[Mapping[str, Mapping[str, Any]]] = MappingProxyType(
    {name: MappingProxyType(values) for name, values in _PRESETS.items()}
)
#: Every knob name (the keys of each preset).
KNOBS: Final[tuple[str, ...]] = tuple(_ADAFACTOR_V2)
