r"""A hand-written C kernel for the hot case of Adafactor on the CPU: a factored fp32 matrix.

Why C and not ``torch.compile``: the factored step is three streaming passes over the gradient (statistics, the RMS
for update clipping, the write-back), and the statistics pass must produce row *and* column sums of :math:`g^2` in
one sweep. Inductor emits the column sum as a separate strided reduction and re-reads the gradient for each stage
(about four reads, see ``docs/benchmarks.md``); this kernel does exactly three, each a unit-stride loop that the C
compiler vectorises, and for the layer-sized matrices of an LLM (a few MB) passes two and three hit the cache.

Per matrix :math:`g \in \mathbb{R}^{R \times C}` (row-major), with :math:`w = 1 - \beta_{2,t}`:

.. math::
    \begin{aligned}
    &\text{pass 1: } s_i = \textstyle\sum_j g_{ij}^2,\ t_j = \sum_i g_{ij}^2;\quad
      R_i \leftarrow R_i + w\,(s_i/C + \epsilon_1 - R_i),\ C_j \leftarrow C_j + w\,(t_j/R + \epsilon_1 - C_j) \\
    &a_i = (R_i / \bar R)^{-1/2},\quad b_j = C_j^{-1/2},\quad U_{ij} = \pm g_{ij}\,a_i b_j \\
    &\text{pass 2 (clipping): } c = 1/\max\big(1, \mathrm{RMS}(U)/d\big) \\
    &\text{pass 3: } m \leftarrow \mathrm{lerp}(m, cU, 1-\beta_1) \text{ (before or after } \alpha_t\text{)},\quad
      x \leftarrow x - r\,x - \alpha_t\,m
    \end{aligned}

This is the algorithm of :class:`hf_optim.Adafactor` (the box in its docstring; rules in :mod:`hf_optim._adafactor_rule`) for ``eps1_mode="add"`` and no L2 term; anything else (bf16
parameters, unfactored tensors, FSDP2 shards, clamp epsilon) stays on the other paths. The library is compiled
once per machine with the system C compiler (~0.3 s) into ``$HF_OPTIM_CACHE`` (default ``~/.cache/hf_optim``) and
loaded with :mod:`ctypes`; no compiler means the other paths are used, with one warning.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t h) {
    uint32_t bits = ((uint32_t)h) << 16; float f; memcpy(&f, &bits, 4); return f;
}
static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even, as torch */
    uint32_t bits; memcpy(&bits, &f, 4);
    /* No NaN special case: arithmetic produces quiet NaNs (0x7fc00000 and up), which this keeps NaN. */
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

/* torch's lerp (ATen lerp_vec): one fused multiply-add from the nearer end, so results round as torch's. */
static inline float lerpf(float start, float end, float w) {
    return w < 0.5f ? fmaf(w, end - start, start) : fmaf(w - 1.0f, end - start, end);
}

/* Statistics pass over rows [0, R) of a block. Updates the row statistics in place and writes two column vectors:
   cs_j = sum_i g_ij^2 and ts_j = sum_i g_ij^2 / row_i (row_i already updated). The second needs row i's sum first,
   so each row is swept twice, the second time from L1 cache: this replaces a whole pass over g for clipping, since
   sum_ij U_ij^2 = mean(row) * sum_j ts_j / col_j. */
static inline float af_row_update(float* row_i, float s, long C, float w, float eps1) {
    *row_i = lerpf(*row_i, s / (float)C + eps1, w);
    return 1.0f / *row_i;
}

void af_sums(const float* g, float* row, float* cs, float* ts, long R, long C, float w, float eps1) {
    for (long j = 0; j < C; j++) { cs[j] = 0.0f; ts[j] = 0.0f; }
    /* Four far-apart rows at a time: four concurrent sequential streams read faster than one on a single core
       (measured 16.7 vs 12.5 GB/s), and cs/ts are loaded and stored once per four rows. */
    const long q = R / 4;
    for (long i = 0; i < q; i++) {
        const float *g0 = g + i * C, *g1 = g0 + q * C, *g2 = g1 + q * C, *g3 = g2 + q * C;
        float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
        if (i + 1 < q) {
            /* Ask for each stream's next row now: the hardware prefetcher alone leaves this pass at ~11 GB/s,
               below the ~17 GB/s four read streams reach (measured 20.5 -> 18.5 ms on the 58M set). */
            for (long j = 0; j < C; j += 16) {
                __builtin_prefetch(g0 + C + j); __builtin_prefetch(g1 + C + j);
                __builtin_prefetch(g2 + C + j); __builtin_prefetch(g3 + C + j);
            }
        }
        for (long j = 0; j < C; j++) {
            float q0 = g0[j] * g0[j], q1 = g1[j] * g1[j], q2 = g2[j] * g2[j], q3 = g3[j] * g3[j];
            s0 += q0; s1 += q1; s2 += q2; s3 += q3; cs[j] += (q0 + q1) + (q2 + q3);
        }
        const float i0 = af_row_update(row + i, s0, C, w, eps1), i1 = af_row_update(row + i + q, s1, C, w, eps1),
                    i2 = af_row_update(row + i + 2 * q, s2, C, w, eps1),
                    i3 = af_row_update(row + i + 3 * q, s3, C, w, eps1);
        for (long j = 0; j < C; j++)
            ts[j] += (g0[j] * g0[j] * i0 + g1[j] * g1[j] * i1) + (g2[j] * g2[j] * i2 + g3[j] * g3[j] * i3);
    }
    for (long i = 4 * q; i < R; i++) {  /* the last R % 4 rows */
        const float* gi = g + i * C;
        float s = 0.0f;
        for (long j = 0; j < C; j++) { float v = gi[j] * gi[j]; s += v; cs[j] += v; }
        const float inv = af_row_update(row + i, s, C, w, eps1);
        for (long j = 0; j < C; j++) ts[j] += gi[j] * gi[j] * inv;
    }
}

/* Column statistics from nparts partial sums (C apart), the factors a_i = (R_i / mean R)^-1/2 and b_j = C_j^-1/2;
   returns sum_ij U_ij^2 (U = g a b, before clipping). */
double af_finalize(float* row, float* col, const float* cs, const float* ts, int nparts, float* a, float* b, long R,
                   long C, float w, float eps1) {
    double total = 0.0;
    for (long i = 0; i < R; i++) total += row[i];
    const float mean = (float)(total / (double)R);
    for (long i = 0; i < R; i++) a[i] = 1.0f / sqrtf(row[i] / mean);
    double sumsq = 0.0;
    for (long j = 0; j < C; j++) {
        float c = cs[j];
        double t = ts[j];
        for (int k = 1; k < nparts; k++) { c += cs[k * C + j]; t += ts[k * C + j]; }
        col[j] = lerpf(col[j], c / (float)R + eps1, w);
        b[j] = 1.0f / sqrtf(col[j]);
        sumsq += t / col[j];
    }
    return sumsq * mean;
}

/* adafactor_v2's momentum update over n elements of one row (bf16 momentum before the lr, decay x - r*x). */
#define AF_CHUNK 64
static inline void af_bf16_momentum_chunk(float* restrict x, const float* restrict g, uint16_t* restrict m,
                                          const float* restrict b, long n, float ai, float alpha, float w1, float r) {
    for (long j = 0; j < n; j++) {
        const float u = g[j] * ai * b[j];
        const float old = bf16_to_f32(m[j]);
        const float mj = fmaf(w1, u - old, old);  /* lerp(old, u, w1) for w1 < 0.5, as torch */
        m[j] = f32_to_bf16(mj);
        x[j] = fmaf(-r, x[j], x[j]) - alpha * mj;
    }
}

/* Write-back. scale = +-clip factor; mode 0: no momentum, 1: momentum before lr, 2: momentum after lr.
   m32 or m16 holds the momentum (one of them NULL). decay: x - r*x, or x*(1-r) with factor != 0. */
void af_apply(float* x, const float* g, const float* a, const float* b, long R, long C, float scale, float alpha,
              int mode, float beta1, float* m32, uint16_t* m16, float r, int factor) {
    /* decay: x - r*x as torch's add_(x, alpha=-r), a fused multiply-add */
    const float keep = 1.0f - r, w1 = 1.0f - beta1;
    long first = 0;
    if (!factor && mode == 0) {
        /* No momentum: two far-apart rows per inner loop (twice the concurrent streams, as af_sums). */
        const long half = R / 2;
        for (long i = 0; i < half; i++) {
            const float *g0 = g + i * C, *g1 = g + (i + half) * C;
            float *x0 = x + i * C, *x1 = x + (i + half) * C;
            const float a0 = a[i] * scale, a1 = a[i + half] * scale;
            for (long j = 0; j < C; j++) {
                float u0 = g0[j] * a0 * b[j], u1 = g1[j] * a1 * b[j];
                x0[j] = fmaf(-r, x0[j], x0[j]) - alpha * u0;
                x1[j] = fmaf(-r, x1[j], x1[j]) - alpha * u1;
            }
        }
        first = 2 * half;  /* an odd last row, if any, takes the general loop */
    }
    if (!factor && mode == 1 && m16 && w1 < 0.5f) {
        /* adafactor_v2's case (bf16 momentum before the lr): two far-apart rows, alternating in chunks of 64
           elements. One loop over both rows does not vectorise (the bf16 conversions of two streams); chunks keep
           both streams in flight and each chunk loop vectorises: measured 49 -> 42 ms on the 58M set. */
        const long half = R / 2;
        for (long i = 0; i < half; i++) {
            const long i1 = i + half;
            const float a0 = a[i] * scale, a1 = a[i1] * scale;
            for (long j0 = 0; j0 < C; j0 += AF_CHUNK) {
                const long n = C - j0 < AF_CHUNK ? C - j0 : AF_CHUNK;
                af_bf16_momentum_chunk(x + i * C + j0, g + i * C + j0, m16 + i * C + j0, b + j0, n, a0, alpha, w1, r);
                af_bf16_momentum_chunk(x + i1 * C + j0, g + i1 * C + j0, m16 + i1 * C + j0, b + j0, n, a1, alpha, w1,
                                       r);
            }
        }
        first = 2 * half;
    }
    for (long i = first; i < R; i++) {
        const float* gi = g + i * C; float* xi = x + i * C;
        const float ai = a[i] * scale;
        if (mode == 0) {
            for (long j = 0; j < C; j++) {
                float u = gi[j] * ai * b[j];
                float xv = factor ? xi[j] * keep : fmaf(-r, xi[j], xi[j]);
                xi[j] = xv - alpha * u;
            }
        } else if (m32) {
            float* mi = m32 + i * C;
            for (long j = 0; j < C; j++) {
                float u = gi[j] * ai * b[j];
                float target = mode == 1 ? u : alpha * u;
                float m = lerpf(mi[j], target, w1);
                mi[j] = m;
                float xv = factor ? xi[j] * keep : fmaf(-r, xi[j], xi[j]);
                xi[j] = xv - (mode == 1 ? alpha * m : m);
            }
        } else if (mode == 1 && !factor && w1 < 0.5f) {  /* an odd last row of adafactor_v2's case */
            af_bf16_momentum_chunk(xi, gi, m16 + i * C, b, C, ai, alpha, w1, r);
        } else {
            uint16_t* mi = m16 + i * C;
            for (long j = 0; j < C; j++) {
                float u = gi[j] * ai * b[j];
                float target = mode == 1 ? u : alpha * u;
                float old = bf16_to_f32(mi[j]);
                float m = lerpf(old, target, w1);
                mi[j] = f32_to_bf16(m);
                float xv = factor ? xi[j] * keep : fmaf(-r, xi[j], xi[j]);
                xi[j] = xv - (mode == 1 ? alpha * m : m);
            }
        }
    }
}
"""

# -ffp-contract=off: no implicit FMA contraction; the kernel uses fmaf exactly where torch's kernels fuse, so it
# rounds as the eager path does. -fassociative-math lets the compiler
# vectorise the reductions. No -ffast-math, which could set flush-to-zero for
# the whole process and change torch's own results.
_FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fno-signed-zeros",
          "-fassociative-math"]

_lib: Any = None
_broken: str | None = None


def _cache_dir() -> Path:
    return Path(os.environ.get("HF_OPTIM_CACHE", Path.home() / ".cache" / "hf_optim"))


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: a library built on one CPU may hold instructions another lacks, and a
    cache directory can be shared (a home directory on a cluster), so the CPU is part of the cache key."""
    signature = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features", "model name")):
                    signature += line
    except OSError:
        signature += platform.processor()
    return signature


def _build() -> Any:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc/gcc) on PATH")
    key = hashlib.sha256((_SOURCE + " ".join(_FLAGS) + compiler + _cpu_signature()).encode()).hexdigest()[:16]
    target = _cache_dir() / f"adafactor_{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            src = Path(tmp, "adafactor.c")
            src.write_text(_SOURCE)
            out = Path(tmp, "adafactor.so")
            subprocess.run([compiler, *_FLAGS, str(src), "-o", str(out), "-lm"], check=True, capture_output=True)
            os.replace(out, target)  # atomic: concurrent processes (DDP ranks, test workers) may race here
    lib = ctypes.CDLL(str(target))
    p, n, f, i = ctypes.c_void_p, ctypes.c_long, ctypes.c_float, ctypes.c_int
    lib.af_sums.argtypes = [p, p, p, p, n, n, f, f]
    lib.af_sums.restype = None
    lib.af_finalize.argtypes = [p, p, p, p, i, p, p, n, n, f, f]
    lib.af_finalize.restype = ctypes.c_double
    lib.af_apply.argtypes = [p, p, p, p, n, n, f, f, i, f, p, p, f, i]
    lib.af_apply.restype = None
    return lib


def library() -> Any | None:
    """The loaded kernel library, building it on first use; ``None`` (after one warning) when that fails."""
    global _lib, _broken
    if _lib is None and _broken is None:
        try:
            _lib = _build()
        except (OSError, RuntimeError, subprocess.CalledProcessError) as err:
            detail = getattr(err, "stderr", b"") or b""
            _broken = f"{err} {detail.decode(errors='replace')[:500]}".strip()
            warnings.warn(f"hf-optim: the native Adafactor kernel could not be built ({_broken}); using the other "
                          "implementations.", RuntimeWarning, stacklevel=3)
    return _lib


def supports_group(group: dict[str, Any]) -> bool:
    """Knobs the kernel implements (the others are per-tensor conditions, see :func:`supports_tensor`)."""
    return group["eps1_mode"] == "add" and group["eps1"] is not None and not (
        group["weight_decay"] and group["weight_decay_mode"] == "l2")


def supports_tensor(x: torch.Tensor, g: torch.Tensor, dims: tuple[int, int] | None) -> bool:
    return (dims == (0, 1) and x.dim() == 2 and x.device.type == "cpu" and x.dtype == torch.float32
            and g.dtype == torch.float32 and x.is_contiguous() and g.is_contiguous() and x.numel() > 0)


#: Below this many elements a matrix is stepped on one thread (thread hand-off costs more than it saves).
PARALLEL_MIN_NUMEL = 1 << 18
_pool: ThreadPoolExecutor | None = None


def _blocks(rows: int, numel: int) -> list[tuple[int, int, int]]:
    """``(index, first row, end row)`` blocks, one per torch CPU thread for large matrices: ctypes releases the GIL
    while the C code runs, so the blocks run in parallel like torch's own intra-op threads."""
    threads = torch.get_num_threads() if numel >= PARALLEL_MIN_NUMEL else 1
    n = max(1, min(threads, rows))
    edges = [rows * k // n for k in range(n + 1)]
    return [(k, edges[k], edges[k + 1]) for k in range(n)]


def _map(fn: Any, blocks: list[tuple[int, int, int]]) -> list[Any]:
    global _pool
    if len(blocks) == 1:
        return [fn(*blocks[0])]
    if _pool is None or _pool._max_workers < len(blocks):  # resize when torch's thread count grew
        _pool = ThreadPoolExecutor(max_workers=len(blocks), thread_name_prefix="hf_optim_adafactor")
    return list(_pool.map(lambda block: fn(*block), blocks))


def adafactor_step(x: torch.Tensor, g: torch.Tensor, state: dict[str, Any], *, beta2: float, eps1: float,
                   clip: float | None, alpha: float, decay: float, decay_as_factor: bool, maximize: bool,
                   beta1: float | None, momentum_before_lr: bool) -> None:
    """One factored step of ``x`` in place (see the module docstring)."""
    lib = _lib
    rows, cols = x.shape
    blocks = _blocks(rows, x.numel())
    row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
    parts = len(blocks)
    # One scratch allocation, addressed by byte offsets: column sums cs and ts (one pair per block) | a | b.
    scratch = torch.empty(rows + (2 * parts + 1) * cols, dtype=torch.float32)
    cs = scratch.data_ptr()
    ts = cs + 4 * parts * cols
    a = ts + 4 * parts * cols
    b = a + 4 * rows
    gp, xp, f4 = g.data_ptr(), x.data_ptr(), 4 * cols  # bytes per row
    rp, w = row.data_ptr(), 1.0 - beta2

    _map(lambda k, lo, hi: lib.af_sums(gp + lo * f4, rp + 4 * lo, cs + k * f4, ts + k * f4, hi - lo, cols, w, eps1),
         blocks)
    sumsq = lib.af_finalize(rp, col.data_ptr(), cs, ts, parts, a, b, rows, cols, w, eps1)
    scale = 1.0
    if clip is not None:
        scale = 1.0 / max(1.0, (sumsq / x.numel()) ** 0.5 / clip)
    if maximize:
        scale = -scale
    mode, m = 0, None
    if beta1 is not None:
        mode, m = (1 if momentum_before_lr else 2), state["exp_avg"]
    m_bytes = 2 if m is not None and m.dtype == torch.bfloat16 else 4

    def apply(_: int, lo: int, hi: int) -> None:
        m_ptr = None if m is None else m.data_ptr() + lo * cols * m_bytes
        lib.af_apply(xp + lo * f4, gp + lo * f4, a + 4 * lo, b, hi - lo, cols, scale, alpha,
                     mode, 0.0 if beta1 is None else beta1, m_ptr if m_bytes == 4 else None,
                     m_ptr if m_bytes == 2 else None, decay, int(decay_as_factor))

    _map(apply, blocks)
