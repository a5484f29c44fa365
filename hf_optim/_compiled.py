r"""Compiled (``torch.compile`` / Inductor) step functions for the update rules torch has no fused kernel for.

An optimizer step is a streaming pass over memory; eager PyTorch (even ``foreach``) makes one pass per elementwise
op and per temporary, which is why eager Adafactor is several times slower than ``torch.optim.AdamW(fused=True)``.
Inductor fuses each parameter's elementwise chain into a few loops (reductions + one pointwise write-back), on CPU
(generated C++, vectorised, compiled with the system C++ compiler) and on GPU (Triton).

Design (measured on CPU, see ``docs/benchmarks.md``):

* **One compiled graph per bucket**: tensors of one (shape, dtype, device) are stepped by one call over the list;
  tensors under :data:`SMALL_NUMEL` elements (norm vectors, biases) share one mixed-shape bucket, so a model costs
  about one compilation per distinct large shape (a LLaMA: ~5) plus one. Dynamo unrolls the Python loop over the
  list, so a bucket is split into chunks of :data:`CHUNK` tensors to bound the graph size.
* **Every bucket gets its own copy of the rule's code object** (:func:`compiled_for`): Dynamo keeps its cache and
  its recompile limit (8) per code object, so without copies a process that steps a few models would silently fall
  back to eager after 8 graphs.
* **Hyperparameters that change between steps are 0-d tensors** (lr, beta2_t, the decay rate, bias corrections):
  a Python float would be baked into the graph as a constant and recompile every step. Knobs fixed for a run (β1,
  ε, clipping threshold, flags) are Python constants, so the graph specialises on them.
* ``dynamic=False``: shapes are static per bucket, so Inductor can fully specialise and vectorise the loops.
* The functions are pure tensor code with in-place updates; tests compare them with the optimizers' eager
  ``for-loop`` paths, an independent implementation of the same maths.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

Tensor = torch.Tensor

#: Tensors with fewer elements than this share one mixed-shape bucket (compiling them one shape at a time costs
#: seconds each and saves nothing measurable).
SMALL_NUMEL = 1 << 16
#: Most tensors in one compiled call (Dynamo unrolls the loop over the list: compile time grows with it).
CHUNK = 16


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 maths for fp32/bf16/fp16 parameters, fp64 for fp64 (so float64 reference checks stay exact)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------------------------------
# Adafactor
# --------------------------------------------------------------------------------------------------------------------
def _adafactor_one(
    p: Tensor,
    g: Tensor,
    row: Tensor | None,
    col: Tensor | None,
    v: Tensor | None,
    m: Tensor | None,
    lr: Tensor,
    beta2: Tensor,
    decay: Tensor,
    dims: tuple[int, int] | None,
    k: dict[str, Any],
) -> None:
    r"""One parameter's Adafactor update (the algorithm box of :class:`hf_optim.optim.adafactor.optimizer.Adafactor`),
    written back in place.

    .. math::
        G_2 = g^2 + \epsilon_1,\quad R \leftarrow \mathrm{lerp}(R, \mathrm{mean}_{c} G_2, 1-\beta_{2,t}),\quad
        C \leftarrow \mathrm{lerp}(C, \mathrm{mean}_{r} G_2, 1-\beta_{2,t})

        U = g \,/\, \sqrt{R\,C / \mathrm{mean}_r(R)}\ (\text{or } g/\sqrt{V}),\quad
        U \leftarrow U / \max(1, \mathrm{RMS}(U)/d)

        \alpha_t = \rho_t\,[\max(\epsilon_2, \mathrm{RMS}(x))],\quad
        \Delta = \alpha_t\,\mathrm{lerp}(m, U, 1-\beta_1)\ \text{or}\ \mathrm{lerp}(m, \alpha_t U, 1-\beta_1)

        x \leftarrow x - r\,x - \Delta,\quad r = \text{decay}\cdot\alpha_t^{\,k}

    ``k`` holds the run-constant knobs (see :func:`adafactor_constants`); with ``eps1_mode="clamp"`` (torch)
    ``V = R C / \max(\mathrm{mean}_r R, \epsilon_1)`` and ``U = g / \max(\sqrt V, \epsilon_1)``.
    """
    cd = lr.dtype
    pf = p.to(cd)
    gf = g.to(cd)
    if k["maximize"]:
        gf = -gf
    if k["l2"] != 0.0:
        gf = gf + k["l2"] * pf
    eps1, clamp = k["eps1"], k["clamp"]
    g2 = gf * gf if clamp else gf * gf + eps1
    one_minus_beta2 = 1.0 - beta2
    if dims is not None:
        assert row is not None and col is not None
        rd, cdim = dims
        row.lerp_(g2.mean(dim=cdim), one_minus_beta2)
        col.lerp_(g2.mean(dim=rd), one_minus_beta2)
        rows_k, cols_k = row.unsqueeze(cdim), col.unsqueeze(rd)
        row_mean = rows_k.mean(dim=rd, keepdim=True)
        if clamp:
            inv_v = torch.clamp(rows_k / torch.clamp(row_mean, min=eps1) * cols_k, min=eps1 * eps1).reciprocal()
        else:  # 1/V = (mean R / R) ⊗ (1/C): two small factors instead of an n×m temporary
            inv_v = (row_mean / rows_k) * cols_k.reciprocal()
        update = gf * inv_v.sqrt()
        if k["clip"] is not None:
            # RMS(U)² = mean(g²/V) as a pure reduction, so U is never stored and re-read.
            update = update / _python_max((gf * gf * inv_v).mean().sqrt() / k["clip"], k["max_ignores_nan"])
    else:
        assert v is not None
        v.lerp_(g2, one_minus_beta2)
        update = gf * (torch.clamp(v, min=eps1 * eps1) if clamp else v).rsqrt()
        if k["clip"] is not None:
            update = update / _python_max(update.square().mean().sqrt() / k["clip"], k["max_ignores_nan"])
    step_size = lr
    if k["param_scale_eps2"] is not None:  # α_t from x_{t-1}, before decay
        step_size = lr * _python_max(pf.square().mean().sqrt(), k["max_ignores_nan"], k["param_scale_eps2"])
    if k["beta1"] is None:
        delta = step_size * update
    elif k["momentum_before_lr"]:
        assert m is not None
        new_m = m.to(cd).lerp(update, 1.0 - k["beta1"])
        m.copy_(new_m)  # stored rounded (bf16) when asked; the step uses the fp32 value
        delta = step_size * new_m
    else:
        assert m is not None
        new_m = m.to(cd).lerp(step_size * update, 1.0 - k["beta1"])
        m.copy_(new_m)
        delta = new_m
    rate = decay if k["decay_power"] == 0 else decay * step_size ** k["decay_power"]
    decayed = pf * (1.0 - rate) if k["decay_as_factor"] else pf - rate * pf
    p.copy_(decayed - delta)


def _python_max(x: Tensor, ignores_nan: bool, floor: float = 1.0) -> Tensor:
    """``max(floor, x)``; with ``ignores_nan`` a NaN ``x`` gives ``floor``, as Python's ``max`` in
    torch.optim.Adafactor (see :func:`hf_optim.optim.adafactor.rule.python_max`)."""
    return torch.where(x > floor, x, torch.full_like(x, floor)) if ignores_nan else torch.clamp(x, min=floor)


def adafactor_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    rows: Sequence[Tensor | None],
    cols: Sequence[Tensor | None],
    vs: Sequence[Tensor | None],
    momenta: Sequence[Tensor | None],
    lr: Tensor,
    beta2: Tensor,
    decay: Tensor,
    dims: tuple[tuple[int, int] | None, ...],
    k: dict[str, Any],
) -> None:
    """Adafactor update of a list of parameters (see :func:`_adafactor_one`); ``lr``, ``beta2``, ``decay`` 0-d."""
    for i in range(len(params)):
        _adafactor_one(params[i], grads[i], rows[i], cols[i], vs[i], momenta[i], lr, beta2, decay, dims[i], k)


# --------------------------------------------------------------------------------------------------------------------
# Adam-atan2 and RAdam: the Adam family's rule x <- x(1 - decay) - α F(m, σ sqrt(v) + ε)  (see _adam_kernels)
# --------------------------------------------------------------------------------------------------------------------
def adam_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    alpha: Tensor,
    sigma: Tensor,
    eps: Tensor,
    decay: Tensor,
    k: dict[str, Any],
) -> None:
    r""":math:`g \leftarrow \pm g + \lambda_{l2} x`, :math:`m \leftarrow \mathrm{lerp}(m, g, 1-\beta_1)`,
    :math:`v \leftarrow \beta_2 v + (1-\beta_2) g^2`,
    :math:`x \leftarrow x(1-\text{decay}) - \alpha\,F(m, \sigma\sqrt v + \epsilon)` with :math:`F` = ``atan2``
    (Adam-atan2) or division; :math:`\sigma = 0` is RAdam's un-rectified step :math:`x \leftarrow x - \alpha m`
    (selected in the graph, so one compiled graph serves every step).
    """
    for i in range(len(params)):
        p, g, m, v = params[i], grads[i], exp_avgs[i], exp_avg_sqs[i]
        cd = alpha.dtype
        pf, gf = p.to(cd), g.to(cd)
        if k["maximize"]:
            gf = -gf
        if k["l2"] != 0.0:
            gf = gf + k["l2"] * pf
        m.lerp_(gf, 1.0 - k["beta1"])
        v.mul_(k["beta2"]).addcmul_(gf, gf, value=1.0 - k["beta2"])
        denom = sigma * v.sqrt() + eps
        if k["atan2"]:
            update = _atan2_nonneg_x(m, denom)
        else:
            update = torch.where(sigma > 0, m / denom, m)
        p.copy_(pf * (1.0 - decay) - alpha * update)


#: atan(t) ≈ t·P(t²) on [0, 1]: 7 terms, least squares (Lawson-reweighted) on a dense grid, max error 2.5e-7 in
#: float64 and 3.6e-7 evaluated in float32: a step moves a parameter by lr·a·atan2, so the approximation changes it
#: by < lr·1e-6, far inside the 1e-6 the fast paths are tested to. Two terms fewer than an ulp-exact fit saves ~4
#: vector ops per element in a step that is compute-bound on the CPU. Fitted for this module; the exact
#: ``torch.atan2`` is the for-loop reference it is tested against.
_ATAN_COEFFS = (
    0.9999961114262754,
    -0.3331736764006073,
    0.19807811666843822,
    -0.13233326663521364,
    0.07962337960541209,
    -0.03360395713251685,
    0.0068117030319365945,
)


def _atan2_nonneg_x(y: Tensor, x: Tensor) -> Tensor:
    r"""``atan2(y, x)`` for ``x >= 0`` (Adam-atan2's denominator) as a polynomial: Inductor's CPU ``atan2`` is the
    accurate SLEEF routine, ~5x the cost of the rest of the step; this is a few FMAs and one division.
    :math:`t = \min(|y|, x)/\max(|y|, x)`, :math:`a = \operatorname{atan}(t)`, :math:`\pi/2 - a` when
    :math:`|y| > x`, sign of :math:`y`; ``atan2(0, 0) = 0``."""
    ay = y.abs()
    hi, lo = torch.maximum(ay, x), torch.minimum(ay, x)
    t = lo / hi.clamp_min(torch.finfo(hi.dtype).tiny)  # hi = 0 means lo = 0: t = 0, atan2(0, 0) = 0
    s = t * t
    poly = torch.full_like(s, _ATAN_COEFFS[-1])
    for c in reversed(_ATAN_COEFFS[:-1]):
        poly = poly * s + c
    a = t * poly
    a = torch.where(ay > x, (torch.pi / 2) - a, a)
    return torch.copysign(a, y)


# --------------------------------------------------------------------------------------------------------------------
# Buckets, compilation, fallback
# --------------------------------------------------------------------------------------------------------------------
def inductor_ok(t: Tensor) -> bool:
    """False for the tensors Inductor steps wrongly, which the callers keep on the eager path.

    Measured (torch 2.13, CPU; ``tests/test_compiled.py::test_inductor_corner_stays_eager``): **0-d float64**
    parameters come back unchanged from the Adam-family graph and NaN from the Adafactor graph, while 0-d float32 and
    bfloat16, and float64 of shape ``(1,)`` or ``(3,)``, match the eager for-loop. They are scalars: the eager path
    costs nothing measurable there.
    """
    return not (t.dim() == 0 and t.dtype == torch.float64)


def buckets(tensors: Sequence[Tensor], extra_keys: Sequence[Any] | None = None) -> list[list[int]]:
    """Indices of ``tensors`` grouped into compiled calls: one per (shape, dtype, device, extra key), small tensors
    of one (dtype, device, extra key) together; each group split into chunks of :data:`CHUNK`."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, t in enumerate(tensors):
        extra = extra_keys[i] if extra_keys is not None else None
        shape = "small" if t.numel() < SMALL_NUMEL else tuple(t.shape)
        groups.setdefault((shape, t.dtype, t.device, extra), []).append(i)
    return [idx[j : j + CHUNK] for idx in groups.values() for j in range(0, len(idx), CHUNK)]


_COMPILED: dict[tuple[str, Any], Callable[..., None]] = {}
_BROKEN: dict[str, str] = {}  # device type -> why compilation failed there (one warning per process)


def compiled_for(fn: Callable[..., None], key: Any) -> Callable[..., None]:
    """``torch.compile(fn)`` for one bucket signature ``key``, on a private copy of ``fn``'s code object."""
    cache_key = (fn.__name__, key)
    if cache_key not in _COMPILED:
        copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
        _COMPILED[cache_key] = torch.compile(copy, dynamic=False, fullgraph=True)
    return _COMPILED[cache_key]


def compile_broken(device_type: str) -> bool:
    """True once compilation has failed on this device type in this process (then ``auto`` stays eager)."""
    return device_type in _BROKEN


def mark_broken(device_type: str, exc: Exception) -> None:
    """Remember that compilation failed on ``device_type`` and warn once; every compiled path then stays eager."""
    if device_type in _BROKEN:
        return
    _BROKEN[device_type] = f"{type(exc).__name__}: {exc}"[:500]
    warnings.warn(
        f"hf_optim: torch.compile failed on {device_type!r} ({_BROKEN[device_type][:200]}); using the eager "
        "path from now on. Install a C++ compiler (CPU) or Triton (GPU), or pass implementation='foreach'.",
        RuntimeWarning,
        stacklevel=4,
    )


def run_or_fallback(
    fn: Callable[..., None], key: Any, device_type: str, args: tuple[Any, ...], eager: Callable[[], None]
) -> None:
    """Run the compiled ``fn(*args)``; if compilation fails (no C++ compiler, no Triton, an unsupported op), warn
    once, remember it, and run ``eager()`` instead. Compilation errors are raised before the graph runs, so no state
    has been touched when ``eager()`` starts."""
    if device_type in _BROKEN:
        eager()
        return
    try:
        compiled_for(fn, key)(*args)
    except Exception as exc:  # any backend failure: the eager path is always correct
        if not _is_compile_error(exc):
            raise
        mark_broken(device_type, exc)
        eager()


def _is_compile_error(exc: Exception) -> bool:
    """Errors from Dynamo/Inductor or the toolchain, as opposed to errors of the maths (shape mismatch, ...)."""
    module = type(exc).__module__ or ""
    return (
        module.startswith(("torch._dynamo", "torch._inductor"))
        or isinstance(exc, (OSError, ImportError))
        or "CppCompileError" in type(exc).__name__
        or "InductorError" in type(exc).__name__
    )


# --------------------------------------------------------------------------------------------------------------------
# Glue: one optimizer group through the compiled rules
# --------------------------------------------------------------------------------------------------------------------
#: ``implementation="auto"`` compiles a group only from this many elements: a compilation costs seconds per bucket
#: (``docs/benchmarks.md``), which a small model never earns back (and unit tests stay eager).
AUTO_MIN_NUMEL = 1 << 20


def _scalar(value: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.tensor(value, dtype=dtype, device=device)


def adafactor_group(items: Sequence[Any], group: dict[str, Any], eager: Callable[[list[Any]], None]) -> None:
    """Step ``items`` (:class:`hf_optim.optim.adafactor.rule.Item`: tensors, state, factored dims and the step's
    :class:`~hf_optim.optim.adafactor.rule.StepScalars`) of one Adafactor group, ``step`` already incremented;
    ``eager(sub_items)`` is the fallback when compilation fails. The decay rate is ``c·α_t^k`` from the scalars:
    with parameter scaling α_t is known only in the graph, so ``c`` enters as a 0-d tensor and ``k`` as a constant."""
    from .decay import l2_coefficient

    mode, wd = group["weight_decay_mode"], group["weight_decay"]
    # k is fixed by the group's knobs, so every item of the group has the same one.
    power = items[0].scalars.decay_power if items else 0
    beta1 = group["beta1"]
    base = dict(
        maximize=group["maximize"],
        l2=l2_coefficient(mode, wd),
        clamp=group["eps1_mode"] == "clamp",
        clip=group["clip_threshold"],
        max_ignores_nan=group["max_ignores_nan"],
        param_scale_eps2=group["eps2"] if group["scale_parameter"] else None,
        beta1=beta1,
        momentum_before_lr=group["momentum_before_lr"],
        decay_power=power,
        decay_as_factor=group["decay_as_factor"],
    )
    xs = [it.x for it in items]
    moms = [it.state.get("exp_avg") if beta1 is not None else None for it in items]
    extra = [(it.dims, it.scalars, None if m is None else m.dtype) for it, m in zip(items, moms)]
    for idx in buckets(xs, extra):
        x0, sc = items[idx[0]].x, items[idx[0]].scalars
        cd, dev = compute_dtype(x0.dtype), x0.device
        k = {**base, "eps1": group["eps1"] if group["eps1"] is not None else torch.finfo(x0.dtype).eps}
        states = [items[i].state for i in idx]
        dims = tuple(items[i].dims for i in idx)
        args = (
            [xs[i] for i in idx],
            [items[i].g for i in idx],
            [s.get("exp_avg_sq_row") if d is not None else None for s, d in zip(states, dims)],
            [s.get("exp_avg_sq_col") if d is not None else None for s, d in zip(states, dims)],
            [s.get("exp_avg_sq") if d is None else None for s, d in zip(states, dims)],
            [moms[i] for i in idx],
            _scalar(sc.rho, cd, dev),
            _scalar(sc.beta2, cd, dev),
            _scalar(sc.decay_coef, cd, dev),
            dims,
            k,
        )
        # Not the step scalars (they are tensor arguments): one graph serves every step.
        key = (
            tuple((tuple(xs[i].shape), xs[i].dtype, items[i].g.dtype, extra[i][0], extra[i][2]) for i in idx),
            str(dev),
            tuple(sorted(k.items())),
        )
        run_or_fallback(adafactor_step, key, dev.type, args, lambda idx=idx: eager([items[i] for i in idx]))
