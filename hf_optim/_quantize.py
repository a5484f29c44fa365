r"""Block-wise logarithmic quantisation of optimizer state to 8 or 4 bits (``state_dtype="int8"`` / ``"int4"``).

A state tensor is cut into blocks of ``block`` consecutive elements (row-major; the last block may be short). Each
block keeps its absolute maximum :math:`s_b` in float32, and each element the index of the nearest *code* of
:math:`y = x / s_b \in [-1, 1]`, where nearness is measured in :math:`\log_2 |y|` (the codes are geometric, so every
code's relative error is the same):

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

Storage: 8-bit codes as a ``uint8`` tensor of the state's shape; 4-bit codes packed two per byte (element ``2i`` in
the low nibble of byte ``i``) in a flat ``uint8`` tensor of ``ceil(numel / 2)`` bytes; the scales as a flat float32
tensor of ``ceil(numel / block)`` entries.

References: Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization" (block-wise scales; their map is a
dynamic tree, this one geometric); Li et al. 2023, "Memory Efficient Optimizers with 4-bit States" (the zero point).
"""

from __future__ import annotations

import math
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


def stored_numel(numel: int, bits: int) -> int:
    """Bytes of codes for ``numel`` elements."""
    return numel if bits == 8 else -(-numel // 2)


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


def quantize(x: torch.Tensor, book: Codebook, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scales)`` of the float tensor ``x``; see the module docstring for the layout."""
    flat = x.detach().reshape(-1).float()
    numel = flat.numel()
    pad = n_blocks(numel, block) * block - numel
    blocks = (torch.nn.functional.pad(flat, (0, pad)) if pad else flat).view(-1, block)
    args = (blocks, book.magnitudes, book.binades, book.signed, book.bits)
    codes, scales = _run("encode", book, numel, x.device, _encode_blocks, *args)
    codes = codes.reshape(-1)[:numel]
    if book.bits == 4:
        if numel % 2:
            codes = torch.cat([codes, codes.new_zeros(1)])
        pairs = codes.view(-1, 2)
        codes = pairs[:, 0] | (pairs[:, 1] << 4)
    else:
        codes = codes.view(x.shape)
    return codes, scales


def dequantize(
    codes: torch.Tensor, scales: torch.Tensor, book: Codebook, block: int, shape: torch.Size, dtype: torch.dtype
) -> torch.Tensor:
    """The tensor of ``shape`` and ``dtype`` that ``(codes, scales)`` stand for."""
    numel = math.prod(shape)
    flat = codes.reshape(-1)
    if book.bits == 4:
        flat = torch.stack([flat & 15, flat >> 4], dim=1).reshape(-1)[:numel]
    pad = n_blocks(numel, block) * block - numel
    blocks = (torch.nn.functional.pad(flat, (0, pad)) if pad else flat).view(-1, block)
    table = book.values().to(device=codes.device, dtype=torch.float32)
    values = _run("decode", book, numel, codes.device, _decode_blocks, blocks, scales, table)
    return values.reshape(-1)[:numel].reshape(shape).to(dtype)
