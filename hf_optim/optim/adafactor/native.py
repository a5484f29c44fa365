r"""A hand-written C kernel for the hot case of Adafactor on the CPU: a factored fp32 matrix.

Why C and not ``torch.compile``: a factored step needs the row *and* column sums of :math:`g^2` before any update,
and the RMS of the update for clipping; Inductor emits the column sum as a separate strided reduction and re-reads
the gradient for each stage (about four reads, see ``docs/benchmarks.md``). This kernel reads it twice, each time in
a unit-stride loop that the C compiler vectorises; for the layer-sized matrices of an LLM (a few MB) the second read
comes from cache.

Per matrix :math:`g \in \mathbb{R}^{R \times C}` (row-major), with :math:`w = 1 - \beta_{2,t}`:

.. math::
    \begin{aligned}
    &\text{pass 1: } s_i = \textstyle\sum_j g_{ij}^2,\ t_j = \sum_i g_{ij}^2;\quad
      R_i \leftarrow R_i + w\,(s_i/C + \epsilon_1 - R_i),\ C_j \leftarrow C_j + w\,(t_j/R + \epsilon_1 - C_j),\\
    &\qquad \tau_j = \textstyle\sum_i g_{ij}^2 / R_i \ \text{(row } i \text{ again, from L1)}\\
    &a_i = (R_i / \bar R)^{-1/2},\quad b_j = C_j^{-1/2},\quad U_{ij} = \pm g_{ij}\,a_i b_j,\quad
      \textstyle\sum_{ij} U_{ij}^2 = \bar R \sum_j \tau_j / C_j,\quad c = 1/\max\big(1, \mathrm{RMS}(U)/d\big) \\
    &\text{pass 2: } m \leftarrow \mathrm{lerp}(m, cU, 1-\beta_1) \text{ (before or after } \alpha_t\text{)},\quad
      x \leftarrow x - r\,x - \alpha_t\,m
    \end{aligned}

This is the algorithm of :class:`hf_optim.Adafactor` (the box in its docstring; the eager rules in
:mod:`hf_optim.optim.adafactor.rule`) for ``eps1_mode="add"`` and no L2 term; anything else (bf16 parameters, unfactored
tensors, FSDP2 shards, clamp epsilon) stays on the other paths. The C source is ``native.c`` next to this
module; it is compiled once per machine and CPU with the system C compiler (~0.3 s) into ``$HF_OPTIM_CACHE``
(default ``~/.cache/hf_optim``) and loaded with :mod:`ctypes`; no compiler means the other paths are used, with one
warning. On one thread every matrix of a group is stepped in a single C call (:func:`adafactor_steps`); with
several threads a large matrix is split into row blocks, one per thread (:func:`adafactor_step`).
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
from typing import Any, NamedTuple

import torch

#: The kernel's C source, shipped next to this module (package data), compiled at first use.
_SOURCE_PATH = Path(__file__).with_name("native.c")

# -ffp-contract=off: no implicit FMA contraction; the kernel uses fmaf exactly where torch's kernels fuse, so it
# rounds as the eager path does. -fassociative-math lets the compiler
# vectorise the reductions. No -ffast-math, which could set flush-to-zero for
# the whole process and change torch's own results.
_FLAGS = [
    "-O3",
    "-march=native",
    "-fPIC",
    "-shared",
    "-ffp-contract=off",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-fno-signed-zeros",
    "-fassociative-math",
]

_lib: Any = None
_broken: str | None = None


def _cache_dir() -> Path:
    return Path(os.environ.get("HF_OPTIM_CACHE", Path.home() / ".cache" / "hf_optim"))


def _source() -> str:
    return _SOURCE_PATH.read_text()


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
    key = hashlib.sha256((_source() + " ".join(_FLAGS) + compiler + _cpu_signature()).encode()).hexdigest()[:16]
    target = _cache_dir() / f"adafactor_{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            src = Path(tmp, "adafactor.c")
            src.write_text(_source())
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
    lib.af_step_batch.argtypes = [n, p, p, p, p, f, f, i, i, f, i]
    lib.af_step_batch.restype = None
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
            warnings.warn(
                f"hf-optim: the native Adafactor kernel could not be built ({_broken}); using the other "
                "implementations.",
                RuntimeWarning,
                stacklevel=3,
            )
    return _lib


def supports_group(group: dict[str, Any]) -> bool:
    """Knobs the kernel implements (the others are per-tensor conditions, see :func:`supports_tensor`)."""
    return (
        group["eps1_mode"] == "add"
        and group["eps1"] is not None
        and not group["max_ignores_nan"]
        and not (group["weight_decay"] and group["weight_decay_mode"] == "l2")
    )


def supports_tensor(x: torch.Tensor, g: torch.Tensor, dims: tuple[int, int] | None) -> bool:
    return (
        dims == (0, 1)
        and x.dim() == 2
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and g.dtype == torch.float32
        and x.is_contiguous()
        and g.is_contiguous()
        and x.numel() > 0
    )


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


class Job(NamedTuple):
    """One matrix of a step, with its scalars (from :class:`hf_optim.optim.adafactor.rule.StepScalars`)."""

    x: torch.Tensor
    g: torch.Tensor
    state: dict[str, Any]
    beta2: float  # β2_t
    alpha: float  # the step size α_t (after parameter scaling)
    decay: float  # the decay rate r_t


def adafactor_steps(
    jobs: list[Job],
    *,
    eps1: float,
    clip: float | None,
    decay_as_factor: bool,
    maximize: bool,
    beta1: float | None,
    momentum_before_lr: bool,
) -> None:
    """Step every matrix of ``jobs`` in place: matrices large enough for several threads one at a time in row
    blocks (:func:`adafactor_step`), all the others in a single C call."""
    threads = torch.get_num_threads()
    group_knobs = dict(
        eps1=eps1,
        clip=clip,
        decay_as_factor=decay_as_factor,
        maximize=maximize,
        beta1=beta1,
        momentum_before_lr=momentum_before_lr,
    )
    batch = []
    for job in jobs:
        if threads > 1 and job.x.numel() >= PARALLEL_MIN_NUMEL:
            x, g, state, beta2, alpha, decay = job
            adafactor_step(x, g, state, beta2=beta2, alpha=alpha, decay=decay, **group_knobs)
        else:
            batch.append(job)
    if not batch:
        return
    mode = 0 if beta1 is None else (1 if momentum_before_lr else 2)
    ptrs, dims, vals = [], [], []
    for x, g, state, beta2, alpha, decay in batch:
        m = state.get("exp_avg") if beta1 is not None else None
        m32 = m.data_ptr() if m is not None and m.dtype == torch.float32 else 0
        m16 = m.data_ptr() if m is not None and m.dtype == torch.bfloat16 else 0
        ptrs += [
            x.data_ptr(),
            g.data_ptr(),
            state["exp_avg_sq_row"].data_ptr(),
            state["exp_avg_sq_col"].data_ptr(),
            m32,
            m16,
        ]
        dims += x.shape
        vals += [1.0 - beta2, alpha, decay]
    # The tables are float32 / int64 tensors, so the kernel sees exactly the float32 scalars adafactor_step passes.
    ptr_table = torch.tensor(ptrs, dtype=torch.int64)
    dim_table = torch.tensor(dims, dtype=torch.long)
    val_table = torch.tensor(vals, dtype=torch.float32)
    scratch = torch.empty(max(x.shape[0] + 3 * x.shape[1] for x, *_ in batch), dtype=torch.float32)
    _lib.af_step_batch(
        len(batch),
        ptr_table.data_ptr(),
        dim_table.data_ptr(),
        val_table.data_ptr(),
        scratch.data_ptr(),
        eps1,
        0.0 if clip is None else clip,
        int(maximize),
        mode,
        0.0 if beta1 is None else beta1,
        int(decay_as_factor),
    )


def adafactor_step(
    x: torch.Tensor,
    g: torch.Tensor,
    state: dict[str, Any],
    *,
    beta2: float,
    eps1: float,
    clip: float | None,
    alpha: float,
    decay: float,
    decay_as_factor: bool,
    maximize: bool,
    beta1: float | None,
    momentum_before_lr: bool,
) -> None:
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

    _map(
        lambda k, lo, hi: lib.af_sums(gp + lo * f4, rp + 4 * lo, cs + k * f4, ts + k * f4, hi - lo, cols, w, eps1),
        blocks,
    )
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
        lib.af_apply(
            xp + lo * f4,
            gp + lo * f4,
            a + 4 * lo,
            b,
            hi - lo,
            cols,
            scale,
            alpha,
            mode,
            0.0 if beta1 is None else beta1,
            m_ptr if m_bytes == 4 else None,
            m_ptr if m_bytes == 2 else None,
            decay,
            int(decay_as_factor),
        )

    _map(apply, blocks)
