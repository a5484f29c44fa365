r"""Block-wise logarithmic quantisation of optimizer state to 8 or 4 bits (``state_dtype="int8"`` / ``"int4"``).

A state tensor is viewed as a matrix of *rows* (its first dim; the rest flattened into the columns; a 1-D tensor is one
row) and each row is cut into blocks of ``block`` consecutive elements (the last block of a row may be short). Blocks
never cross rows, so a tensor split along its first dim (FSDP2's ``Shard(0)``) is quantised shard by shard exactly as
it would be whole, and its codes and scales shard with it. Each block keeps its absolute maximum :math:`s_b` in
float32, and each element the index of the nearest *code* of :math:`y = x / s_b \in [-1, 1]`, where nearness is
measured in :math:`\log_2 |y|` (the codes are geometric, so every code's relative error is the same):

* **signed** (moments that change sign: Adam's ``exp_avg``, momentum buffers), :math:`n = 2^{b-1} - 1` magnitudes:
  code :math:`c = \text{sign bit} \cdot 2^{b-1} + k`, :math:`|y| \approx 2^{-R (n-k)/(n-1)}` for
  :math:`k = 1 \dots n` and :math:`0` for :math:`k = 0` (magnitudes below half the smallest code);
* **unsigned** (non-negative statistics: ``exp_avg_sq``, AdaGrad's ``sum``, RMSProp's ``square_avg``),
  :math:`n = 2^b` codes :math:`y \approx 2^{-R (n-1-k)/(n-1)}`, :math:`k = 0 \dots n-1`, *without* a zero: a
  second moment that rounded to 0 would turn Adam's :math:`m/(\sqrt v + \epsilon)` into :math:`m/\epsilon` (the
  zero-point problem of Li et al. 2023); values below the smallest code round up to it. A block whose maximum is 0
  stays exactly 0 (:math:`s_b = 0`).

:math:`R` (binades below the block maximum that the codes cover) is :data:`BINADES`: int8 signed 20 (relative step
:math:`2^{20/126} = 1.116`), unsigned 40 (:math:`2^{40/255} = 1.115`; a second moment spans twice the binades of the
gradient), int4 signed 6 (step 2), unsigned 12 (step :math:`2^{12/15} = 1.74`). The block maximum itself is exact.

Storage (:func:`codes_shape`, :func:`scales_shape`): 8-bit codes as a ``uint8`` tensor of the state's shape; 4-bit
codes packed two per byte along each row (element ``2i`` of a row in the low nibble of its byte ``i``), a
``(rows, ceil(cols / 2))`` ``uint8`` tensor (1-D: ``(ceil(numel / 2),)``); the scales as a float32 tensor of
``(rows, ceil(cols / block))`` entries (1-D: ``(ceil(numel / block),)``).

References: Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization" (block-wise scales; their map is a
dynamic tree, this one geometric); Li et al. 2023, "Memory Efficient Optimizers with 4-bit States" (the zero point).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

#: (bits, signed) -> binades R the codes cover below the block maximum.
BINADES: dict[tuple[int, bool], float] = {(8, True): 20.0, (8, False): 40.0, (4, True): 6.0, (4, False): 12.0}


class Codebook(NamedTuple):
    bits: int
    signed: bool

    @property
    def binades(self) -> float:
        return BINADES[(self.bits, self.signed)]

    @property
    def magnitudes(self) -> int:
        """Number of non-zero magnitudes: ``2^(b-1) - 1`` signed, ``2^b`` unsigned."""
        return (1 << (self.bits - 1)) - 1 if self.signed else 1 << self.bits

    def values(self) -> torch.Tensor:
        """Every code's value in [-1, 1] (float64), indexed by code: the decoding table."""
        n, r = self.magnitudes, self.binades
        if not self.signed:
            return torch.tensor([2.0 ** (-r * (n - 1 - k) / (n - 1)) for k in range(n)], dtype=torch.float64)
        half = [0.0] + [2.0 ** (-r * (n - k) / (n - 1)) for k in range(1, n + 1)]
        return torch.tensor(half + [-x for x in half], dtype=torch.float64)


def n_blocks(numel: int, block: int) -> int:
    return -(-numel // block)


def rows_and_cols(shape: Sequence[int]) -> tuple[int, int]:
    """The matrix a state of ``shape`` is quantised as: its first dim by the product of the others (1-D: one row)."""
    if len(shape) < 2:
        return 1, math.prod(shape)
    return shape[0], math.prod(shape[1:])


def _per_row(shape: Sequence[int], per_row: int) -> tuple[int, ...]:
    rows, _ = rows_and_cols(shape)
    return (per_row,) if len(shape) < 2 else (rows, per_row)


def codes_shape(shape: Sequence[int], bits: int) -> tuple[int, ...]:
    """Shape of the ``uint8`` codes of a state of ``shape``: the shape itself (8 bits), two codes per byte along each
    row (4 bits)."""
    if bits == 8:
        return tuple(shape)
    return _per_row(shape, -(-rows_and_cols(shape)[1] // 2))


def scales_shape(shape: Sequence[int], block: int) -> tuple[int, ...]:
    """Shape of the float32 scales of a state of ``shape``: one per block of each row."""
    return _per_row(shape, n_blocks(rows_and_cols(shape)[1], block))


#: Tensors of at least this many elements are (de)quantised by a compiled kernel (one fused loop instead of ~20 eager
#: passes); smaller ones, and every tensor once compilation failed on the device, run the eager functions below.
COMPILE_MIN_NUMEL = 1 << 16
_KERNELS: dict[tuple[str, Codebook], Any] = {}


def _encode_blocks(
    blocks: torch.Tensor, n: int, r: float, signed: bool, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (uint8, one per element, not packed) and scales of ``blocks`` (one block per row)."""
    scales = blocks.abs().amax(dim=1)
    y = blocks / torch.where(scales > 0, scales, torch.ones_like(scales)).unsqueeze(1)
    magnitude = y.abs()
    # t = 0 at |y| = 1, t = n - 1 at the smallest code: round in log2 space
    t = torch.round(-torch.log2(magnitude.clamp(min=2.0**-126)) * (n - 1) / r)
    if signed:
        k = (n - t).clamp(min=1, max=n)
        k = torch.where(magnitude < 2.0 ** (-r) / 2, torch.zeros_like(k), k)  # nearer 0 than the smallest code
        codes = k + torch.where(y < 0, float(1 << (bits - 1)), 0.0)
    else:
        codes = (n - 1 - t).clamp(min=0, max=n - 1)
    return codes.to(torch.uint8), scales


def _decode_blocks(codes: torch.Tensor, scales: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Values of ``codes`` (one block per row, uint8) scaled by their block's scale."""
    return table[codes.long()] * scales.unsqueeze(1)


def _run(name: str, book: Codebook, numel: int, device: torch.device, eager: Any, *args: Any) -> Any:
    """``eager(*args)`` through its compiled kernel for large tensors (:data:`COMPILE_MIN_NUMEL`); a compilation
    failure warns once per device type (as every compiled path of the package) and stays eager."""
    from . import _compiled

    if numel < COMPILE_MIN_NUMEL or _compiled.compile_broken(device.type):
        return eager(*args)
    key = (name, book)
    if key not in _KERNELS:
        _KERNELS[key] = torch.compile(eager, dynamic=True)
    try:
        return _KERNELS[key](*args)
    except Exception as exc:
        if not _compiled._is_compile_error(exc):
            raise
        _compiled.mark_broken(device.type, exc)
        return eager(*args)


def _blocks(rows: torch.Tensor, block: int) -> torch.Tensor:
    """``rows`` (a matrix) padded with zeros to whole blocks: one block per row of the result."""
    pad = n_blocks(rows.shape[1], block) * block - rows.shape[1]
    return (torch.nn.functional.pad(rows, (0, pad)) if pad else rows).reshape(-1, block)


def quantize(x: torch.Tensor, book: Codebook, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scales)`` of the float tensor ``x``; see the module docstring for the layout."""
    n_rows, n_cols = rows_and_cols(x.shape)
    blocks = _blocks(x.detach().reshape(n_rows, n_cols).float(), block)
    args = (blocks, book.magnitudes, book.binades, book.signed, book.bits)
    codes, scales = _run("encode", book, x.numel(), x.device, _encode_blocks, *args)
    codes = codes.view(n_rows, -1)[:, :n_cols]
    if book.bits == 4:
        if n_cols % 2:
            codes = torch.cat([codes, codes.new_zeros(n_rows, 1)], dim=1)
        codes = codes[:, 0::2] | (codes[:, 1::2] << 4)
    # contiguous: a view of the padded blocks would keep their storage alive, and a DTensor built on it (FSDP2) would
    # claim strides its local tensor does not have
    codes = codes.reshape(codes_shape(x.shape, book.bits)).contiguous()
    return codes, scales.reshape(scales_shape(x.shape, block))


def dequantize(
    codes: torch.Tensor, scales: torch.Tensor, book: Codebook, block: int, shape: Sequence[int], dtype: torch.dtype
) -> torch.Tensor:
    """The tensor of ``shape`` and ``dtype`` that ``(codes, scales)`` stand for."""
    n_rows, n_cols = rows_and_cols(shape)
    rows = codes.reshape(n_rows, -1)
    if book.bits == 4:
        rows = torch.stack([rows & 15, rows >> 4], dim=2).reshape(n_rows, -1)[:, :n_cols]
    table = book.values().to(device=codes.device, dtype=torch.float32)
    blocks = _blocks(rows, block)
    values = _run("decode", book, n_rows * n_cols, codes.device, _decode_blocks, blocks, scales.reshape(-1), table)
    return values.view(n_rows, -1)[:, :n_cols].reshape(tuple(shape)).to(dtype).contiguous()
