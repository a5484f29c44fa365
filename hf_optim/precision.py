r"""Precision: the one module that decides in which dtype an optimizer computes, keeps its state and writes back.

Every optimizer of this package follows the same policy, so it is decided here once (``tests/test_layout.py`` checks
that no other module compares or chooses floating-point dtypes):

* **compute dtype**: float32 for bf16/fp16/fp32 parameters, float64 for float64 ones (complex: their real
  counterpart, stepped as real and imaginary coordinates);
* **state dtype**: the compute dtype of the parameter (a bf16 parameter gets fp32 moments); the one declared
  exception is a state a class asks for by name (Adafactor's ``momentum_dtype="bfloat16"``), see :func:`named_dtype`;
* **work copy and write-back**: a low-precision parameter is stepped on an fp32 copy that is written back either with
  round-to-nearest-even (``Tensor.copy_``) or, for bf16, with unbiased stochastic rounding (:func:`stochastic_round_`,
  Zamirai et al. 2020, "Revisiting BFloat16 Training");
* **after loading**: ``torch.optim.Optimizer.load_state_dict`` casts floating state to the parameter's dtype, which
  would round an fp32 state of a bf16 parameter to bf16; :func:`keep_loaded_dtypes` restores the saved dtypes and
  :func:`cast_state_` brings a state tensor to the dtype its class keeps.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

#: Parameter dtypes whose maths run on a float32 copy.
LOW_PRECISION: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16)
#: State dtypes a class may ask for by name (aliases accepted by :func:`named_dtype`).
STATE_DTYPE_NAMES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DTYPE_ALIASES: dict[str, str] = {"fp32": "float32", "bf16": "bfloat16"}
#: The dtype of every step counter (0-d, on the host, as torch keeps it: exact up to 2**24 steps).
STEP_DTYPE = torch.float32


def is_low_precision(t: torch.Tensor) -> bool:
    """Whether ``t`` is stepped on a float32 copy (bf16, fp16)."""
    return t.dtype in LOW_PRECISION


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype the maths of a parameter (or gradient) run in: float32 for low precision, else its own dtype."""
    return torch.float32 if t.dtype in LOW_PRECISION else t.dtype


def real_compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The real floating dtype of the maths: float64 for float64/complex128, float32 for everything else."""
    real = t.real.dtype if t.is_complex() else t.dtype
    return torch.float64 if real == torch.float64 else torch.float32


def state_dtype(p: torch.Tensor) -> torch.dtype:
    """The dtype of a state tensor shaped like ``p`` (moments, accumulators): the compute dtype."""
    return compute_dtype(p)


def statistic_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype of a factored statistic of ``t`` (Adafactor's row/column means): float64 or float32."""
    return real_compute_dtype(t)


def named_dtype(name: str) -> torch.dtype:
    """The dtype of a state a class asks for by name (``"float32"``, ``"bfloat16"`` or an alias)."""
    return STATE_DTYPE_NAMES[DTYPE_ALIASES.get(name, name)]


def canonical_dtype_name(name: str) -> str:
    """``"bf16"`` -> ``"bfloat16"``; a name that is not an alias is returned as is (validated by the caller)."""
    return DTYPE_ALIASES.get(name, name)


def work_copy(t: torch.Tensor) -> torch.Tensor:
    """``t`` in its compute dtype: a float32 copy of a low-precision tensor, ``t`` itself otherwise."""
    return t.float() if t.dtype in LOW_PRECISION else t


def new_step() -> torch.Tensor:
    """A fresh step counter."""
    return torch.zeros((), dtype=STEP_DTYPE)


def as_step(value: object) -> torch.Tensor:
    """A loaded step counter as this package keeps it (transformers saves a Python int)."""
    if torch.is_tensor(value) and value.dtype == STEP_DTYPE and value.dim() == 0:
        return value
    return torch.as_tensor(value).to(STEP_DTYPE).reshape(())


def stochastic_rounding_applies(stochastic: bool, t: torch.Tensor) -> bool:
    """Stochastic rounding is defined for bf16 targets only; fp16 and fp32 keep round-to-nearest-even."""
    return stochastic and t.dtype == torch.bfloat16


def stochastic_round_(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Write fp32 ``src`` into bf16 ``dst``, rounding up with probability equal to the discarded fraction.

    A bf16 value is the top 16 bits of an fp32 one: adding uniform noise in ``[0, 2^16)`` to the fp32 bit pattern and
    truncating rounds up exactly when the noise exceeds the distance to the next bf16 value, so ``E[dst] = src``.
    """
    bits = src.view(torch.int32)
    noise = torch.randint_like(bits, 0, 1 << 16)
    dst.copy_(((bits + noise) & -65536).view(torch.float32))  # exact: the low 16 bits are zero


def write_back_(params: Sequence[torch.Tensor], works: Sequence[torch.Tensor], stochastic: bool = False) -> None:
    """Copy each work tensor into its low-precision parameter (where :func:`work_copy` made a copy; other work tensors
    are the parameter or a view of it): round to nearest even, or stochastically for bf16 when ``stochastic``."""
    pairs = [(p, w) for p, w in zip(params, works) if p.dtype in LOW_PRECISION and w is not p]
    if not pairs:
        return
    if stochastic:
        for p, w in pairs:
            if stochastic_rounding_applies(True, p):
                stochastic_round_(p, w)
            else:
                p.copy_(w)
        return
    torch._foreach_copy_([p for p, _ in pairs], [w for _, w in pairs])


def cast_state_(state: dict, key: str, dtype: torch.dtype, device: torch.device | None = None) -> torch.Tensor | None:
    """``state[key]`` brought to ``dtype`` (and ``device``) in place of the stored tensor; ``None`` if absent."""
    value = state.get(key)
    if not torch.is_tensor(value):
        return None
    if value.dtype != dtype or (device is not None and value.device != device):
        value = state[key] = value.to(dtype=dtype, device=device if device is not None else value.device)
    return value


def keep_loaded_dtypes(live: dict, saved: dict, device: torch.device) -> None:
    """After ``Optimizer.load_state_dict``: each floating state tensor in the dtype it was saved in (torch cast it to the
    parameter's), the step counter as :func:`as_step` keeps it."""
    for key, value in saved.items():
        if key == "step":
            live[key] = as_step(live[key])
            continue
        if torch.is_tensor(value) and value.is_floating_point() and live[key].dtype != value.dtype:
            live[key] = value.to(device=device, copy=True)
