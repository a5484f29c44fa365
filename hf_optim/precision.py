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

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch

from . import _distributed, _quantize
from ._state_spec import StateSpec

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


#: ``param_update`` values: how a low-precision parameter receives its fp32 result (no fp32 master copy is kept).
PARAM_UPDATES: tuple[str, ...] = ("nearest", "stochastic", "kahan")
#: The state key of the Kahan compensation: what the last write-back rounded away, in the parameter's dtype.
COMPENSATION = "param_compensation"


def param_update_mode(group: Mapping[str, Any]) -> str:
    """The group's ``param_update`` (Adafactor's older ``stochastic_rounding=True`` means ``"stochastic"``)."""
    if group.get("stochastic_rounding"):
        return "stochastic"
    return group.get("param_update", "nearest")


def work_copy(t: torch.Tensor, state: Mapping[str, Any] | None = None, mode: str = "nearest") -> torch.Tensor:
    """``t`` in its compute dtype: a float32 copy of a low-precision tensor (plus the Kahan compensation the last
    write-back kept, under ``mode="kahan"``), ``t`` itself otherwise."""
    if t.dtype not in LOW_PRECISION:
        return t
    work = t.float()
    if mode == "kahan" and state is not None and torch.is_tensor(state.get(COMPENSATION)):
        work.add_(state[COMPENSATION].float())
    return work


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


def write_back_(
    params: Sequence[torch.Tensor],
    works: Sequence[torch.Tensor],
    stochastic: bool = False,
    *,
    mode: str | None = None,
    states: Sequence[dict] | None = None,
) -> None:
    """Copy each work tensor into its low-precision parameter (where :func:`work_copy` made a copy; other work tensors
    are the parameter or a view of it) as ``mode`` says: ``"nearest"`` (round to nearest even), ``"stochastic"``
    (bf16: unbiased stochastic rounding) or ``"kahan"`` (round to nearest and keep the rounding error in
    ``states[i][COMPENSATION]``, added back by the next :func:`work_copy`: Kahan summation of the updates).
    ``stochastic=True`` is ``mode="stochastic"``."""
    mode = mode or ("stochastic" if stochastic else "nearest")
    keep = [i for i, (p, w) in enumerate(zip(params, works)) if p.dtype in LOW_PRECISION and w is not p]
    pairs = [(params[i], works[i]) for i in keep]
    if not pairs:
        return
    if mode == "kahan":
        for i, (p, w) in zip(keep, pairs):
            p.copy_(w)
            residual = w.sub_(p.float())  # the work copy is not used after the write-back
            state = states[i]
            if torch.is_tensor(state.get(COMPENSATION)):
                state[COMPENSATION].copy_(residual)
            else:
                state[COMPENSATION] = residual.to(p.dtype)
        return
    if mode == "stochastic":
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
    if not torch.is_tensor(value) or not (value.is_floating_point() or value.is_complex()):
        return None  # absent, or the codes of a quantised state (their form is the state format's)
    if value.dtype != dtype or (device is not None and value.device != device):
        value = state[key] = value.to(dtype=dtype, device=device if device is not None else value.device)
    if not value.is_contiguous():  # torch's fused CPU Adam reads a strided state as if it were dense
        value = state[key] = value.contiguous()
    return value


def keep_loaded_dtypes(live: dict, saved: dict, device: torch.device) -> None:
    """After ``Optimizer.load_state_dict``: each floating state tensor in the dtype it was saved in (torch cast it to the
    parameter's), the step counter as :func:`as_step` keeps it."""
    for key, value in saved.items():
        if key == "step":
            live[key] = as_step(live[key])
            continue
        # floating state, and the uint8 codes of quantised state (torch cast them to the parameter's dtype)
        if torch.is_tensor(value) and not value.is_complex() and live[key].dtype != value.dtype:
            live[key] = value.to(device=device, copy=True)


# --- the stored form of optimizer state (``state_dtype``) -------------------------------------------------------------

#: ``state_dtype`` values: how state tensors shaped like their parameter are stored between steps.
STATE_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "int8", "int4")
#: Default ``state_block_size`` (elements per fp32 scale) and ``state_min_numel`` (smaller tensors stay in the compute
#: dtype: their scales would cost more than the codes save, and biases / norms are few).
DEFAULT_BLOCK = 256
DEFAULT_MIN_NUMEL = 4096
SCALE_SUFFIX = "_absmax"
#: Largest number of parameter elements whose state is expanded to the compute dtype at once during a step.
EXPAND_CHUNK_NUMEL = 1 << 22
_BITS = {"int8": 8, "int4": 4}


class StateFormat(NamedTuple):
    """The stored form of a group's state: ``dtype`` (a name of :data:`STATE_DTYPES`), block size, threshold."""

    dtype: str = "float32"
    block: int = DEFAULT_BLOCK
    min_numel: int = DEFAULT_MIN_NUMEL

    @classmethod
    def of(cls, group: Mapping[str, Any]) -> StateFormat:
        return cls(
            group.get("state_dtype", "float32"),
            group.get("state_block_size", DEFAULT_BLOCK),
            group.get("state_min_numel", DEFAULT_MIN_NUMEL),
        )

    @property
    def plain(self) -> bool:
        """State kept as the optimizer computes it (no conversion around the step)."""
        return self.dtype == "float32"

    @property
    def quantized(self) -> bool:
        return self.dtype in _BITS

    def book(self, key: str, nonnegative: Sequence[str]) -> _quantize.Codebook:
        return _quantize.Codebook(_BITS[self.dtype], key not in nonnegative)

    def stores(self, p: torch.Tensor, key: str, value: Any) -> bool:
        """Whether ``state[key]`` of ``p`` is kept in this format: a real floating tensor of the parameter's shape (not
        the step counter; quantised formats: at least ``min_numel`` elements, and under FSDP2 a parameter whose shards
        hold whole rows, so the blocks shard with it: :func:`hf_optim._distributed.rows_shard_whole`)."""
        if key in ("step", COMPENSATION) or key.endswith(SCALE_SUFFIX) or not torch.is_tensor(value):
            return False
        if not value.is_floating_point() or _distributed.local(value).shape != _distributed.local(p).shape:
            return False
        return not self.quantized or self.quantizes(p)

    def quantizes(self, p: torch.Tensor) -> bool:
        """Whether the state tensors shaped like ``p`` are quantised (a quantised format, ``p`` large enough, its
        shards whole rows)."""
        return self.quantized and p.numel() >= self.min_numel and _distributed.rows_shard_whole(p)


def check_state_format(group: Mapping[str, Any]) -> None:
    """``ValueError`` for a ``state_dtype`` / ``state_block_size`` / ``state_min_numel`` / ``param_update`` outside what
    is allowed."""
    from . import _validation as v

    v.check_choice("param_update", group.get("param_update", "nearest"), PARAM_UPDATES)
    if group.get("stochastic_rounding") and group.get("param_update", "nearest") != "nearest":
        raise ValueError(
            f"stochastic_rounding=True and param_update={group['param_update']!r} both choose the write-back of bf16 "
            "parameters; use param_update alone (param_update='stochastic' is stochastic_rounding=True)."
        )

    v.check_choice("state_dtype", group.get("state_dtype", "float32"), STATE_DTYPES)
    for name, low in (("state_block_size", 2), ("state_min_numel", 1)):
        value = group.get(name, DEFAULT_BLOCK if name == "state_block_size" else DEFAULT_MIN_NUMEL)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
    if group.get("state_dtype") == "int4" and group.get("state_block_size", DEFAULT_BLOCK) % 2:
        raise ValueError(
            f"state_block_size must be even with state_dtype='int4' (two codes per byte), got "
            f"{group.get('state_block_size')!r}."
        )


def compress_(state: dict, p: torch.Tensor, fmt: StateFormat, nonnegative: Sequence[str]) -> None:
    """Bring the state of ``p`` from the compute dtype to its stored form (after a step, or after loading). A DTensor
    state (FSDP2) is quantised shard by shard; its codes and scales are DTensors placed like it."""
    if fmt.plain:
        return
    for key, value in list(state.items()):
        if not fmt.stores(p, key, value):
            continue
        if fmt.quantized:
            book = fmt.book(key, nonnegative)
            codes, scales = _quantize.quantize(_distributed.local(value), book, fmt.block)
            if _distributed.is_dtensor(value):
                codes = _distributed.sharded_like(codes, value, _quantize.codes_shape(value.shape, book.bits))
                scales = _distributed.sharded_like(scales, value, _quantize.scales_shape(value.shape, fmt.block))
            state[key], state[key + SCALE_SUFFIX] = codes, scales
        elif value.dtype != torch.bfloat16:
            state[key] = value.to(torch.bfloat16)


def expand_(state: dict, p: torch.Tensor, fmt: StateFormat, nonnegative: Sequence[str], dtype_for: Any) -> None:
    """Bring the stored state of ``p`` back to the dtype the class computes with (``dtype_for(key, p)``)."""
    if fmt.plain:
        return
    for key in [k for k in state if k.endswith(SCALE_SUFFIX)]:
        name = key[: -len(SCALE_SUFFIX)]
        scales, codes = state.pop(key), state[name]
        book = fmt.book(name, nonnegative)
        shape = _distributed.local(p).shape
        values = _quantize.dequantize(
            _distributed.local(codes), _distributed.local(scales), book, fmt.block, shape, dtype_for(name, p)
        )
        state[name] = _distributed.sharded_like(values, codes, p.shape) if _distributed.is_dtensor(codes) else values
    if not fmt.quantized:
        for key, value in list(state.items()):
            if fmt.stores(p, key, value) and value.dtype != dtype_for(key, p):
                state[key] = value.to(dtype_for(key, p))


def expansion_chunks(params: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    """``params`` in consecutive chunks of at most :data:`EXPAND_CHUNK_NUMEL` elements (a larger tensor alone): the
    state expanded at once during a step, so a step's extra memory stays bounded by a chunk, not the model."""
    chunks: list[list[torch.Tensor]] = []
    size = 0
    for p in params:
        if not chunks or size + p.numel() > EXPAND_CHUNK_NUMEL:
            chunks.append([])
            size = 0
        chunks[-1].append(p)
        size += p.numel()
    return chunks


def stored_specs(specs: dict, p: torch.Tensor, group: Mapping[str, Any], nonnegative: Sequence[str]) -> dict:
    """The state entries a loader accepts for ``p`` in ``group``: ``specs`` (what the class keeps in the compute dtype)
    with each quantised tensor's codes (uint8) and scales (float32) in its place (shapes of this rank's shard)."""
    out = dict(specs)
    shape = tuple(_distributed.local(p).shape)
    if param_update_mode(group) == "kahan" and p.dtype in LOW_PRECISION:
        out[COMPENSATION] = StateSpec(shape)  # created by the first write-back
    fmt = StateFormat.of(group)
    if not fmt.quantizes(p) or p.is_complex():
        return out
    for key, spec in specs.items():
        if spec.shape != shape or key == COMPENSATION:  # the tensors compress_ stores: shaped like the parameter
            continue
        out[key] = spec._replace(shape=_quantize.codes_shape(shape, _BITS[fmt.dtype]), dtype=torch.uint8)
        scales = _quantize.scales_shape(shape, fmt.block)
        out[key + SCALE_SUFFIX] = StateSpec(scales, required=spec.required, dtype=torch.float32)
    return out
