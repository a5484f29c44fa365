"""What one ``hf-optim bench`` run measures: each optimizer's first step, then its steps paired with the reference's
(the method is the package's docstring, :mod:`hf_optim.bench`)."""

from __future__ import annotations

import gc
import os
import platform
import re
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .cases import REFERENCE, BenchCase, all_cases, reference_cases
from .params import SIZES, make_params
from .report import (
    DEFAULT_MAX_DRIFT,
    DEFAULT_MAX_SPREAD,
    HEADER,
    check_limits,
    footnote,
    format_count,
    format_row,
    load_average,
    load_note,
    paired_ratio,
    row_flags,
    spread,
)
from .timing import Clock, Reference, state_bytes, timed_repeats, timed_step

DEFAULT_REPEATS = 5


@dataclass
class BenchResult:
    name: str
    status: str = "ok"  # ok | missing | error
    error: str = ""
    kwargs: dict[str, Any] = field(default_factory=dict)
    first_step_s: float | None = None
    median_s: float | None = None
    min_s: float | None = None
    times_s: list[float] = field(default_factory=list)
    state_bytes: int | None = None
    bytes_per_param: float | None = None  # byte model, per parameter element
    gbytes_per_s: float | None = None
    ratio_to_reference: float | None = None  # median over repeats of (case step / paired reference step)
    state_ratio_to_reference: float | None = None
    reference_times_s: list[float] = field(default_factory=list)  # the reference steps paired with times_s
    reference_median_s: float | None = None
    spread: float | None = None  # max/min of times_s
    reference_spread: float | None = None  # max/min of reference_times_s
    reference_drift: float | None = None  # reference_median_s / the reference's median over the run
    flags: list[str] = field(default_factory=list)  # see hf_optim.bench.report.FLAG_CODES


# ----------------------------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------------------------
def _new_result(case: BenchCase) -> BenchResult:
    return BenchResult(
        case.name,
        kwargs={
            k: repr(v) if not isinstance(v, (int, float, str, bool, type(None))) else v for k, v in case.kwargs.items()
        },
    )


def measure(
    case: BenchCase,
    params: list[torch.Tensor],
    warmup: int,
    repeats: int,
    reference: Reference | None = None,
    clock: Clock = time.perf_counter,
) -> BenchResult:
    """Time one case on ``params`` (paired with ``reference`` when given); errors become a row (missing/error)."""
    result = _new_result(case)
    device = params[0].device
    optimizer = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # preset warnings are irrelevant to timing
            try:
                optimizer = case.build(params)
            except (ImportError, AttributeError) as exc:
                result.status, result.error = "missing", f"{type(exc).__name__}: {exc}"
                return result
            result.first_step_s = timed_step(optimizer, device, clock)
            for _ in range(warmup):
                optimizer.step()
            result.times_s, result.reference_times_s = timed_repeats(optimizer, device, repeats, reference, clock)
    except Exception as exc:  # a broken optimizer must show up in the table, not stop the run
        result.status, result.error = "error", f"{type(exc).__name__}: {exc}"[:300]
        return result
    finally:
        if optimizer is not None:
            result.state_bytes = state_bytes(optimizer) if result.status == "ok" else None
        del optimizer
        gc.collect()
    _summarize(result, params, case.grad_reads)
    return result


def _summarize(result: BenchResult, params: list[torch.Tensor], grad_reads: int) -> None:
    """Median, spread, paired ratio and the byte model of a row whose times are in."""
    result.median_s = statistics.median(result.times_s)
    result.min_s = min(result.times_s)
    result.spread = spread(result.times_s)
    if result.reference_times_s:
        result.reference_median_s = statistics.median(result.reference_times_s)
        result.reference_spread = spread(result.reference_times_s)
        result.ratio_to_reference = paired_ratio(result.times_s, result.reference_times_s)
    numel = sum(p.numel() for p in params)
    elem = params[0].element_size()
    moved = 2 * numel * elem + grad_reads * numel * elem + 2 * (result.state_bytes or 0)
    result.bytes_per_param = moved / numel
    result.gbytes_per_s = moved / result.median_s / 1e9 if result.median_s > 0 else None


def _start_reference(
    case: BenchCase, params: list[torch.Tensor], warmup: int, own_repeats: int, clock: Clock
) -> tuple[BenchResult, Reference | None]:
    """Build the reference, time its first step, warm it up (and time ``own_repeats`` steps when it runs alone)."""
    result = _new_result(case)
    device = params[0].device
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            optimizer = case.build(params)
            result.first_step_s = timed_step(optimizer, device, clock)
            for _ in range(warmup):
                optimizer.step()
            result.times_s = [timed_step(optimizer, device, clock) for _ in range(own_repeats)]
    except Exception as exc:  # the other rows still run, without ratios
        result.status, result.error = "error", f"{type(exc).__name__}: {exc}"[:300]
        return result, None
    result.state_bytes = state_bytes(optimizer)
    return result, Reference(optimizer, device, clock)


def _finish(
    results: list[BenchResult], params: list[torch.Tensor], grad_reads: int, max_spread: float, max_drift: float
) -> float | None:
    """Pool the reference's paired steps into its row, set every row's drift and flags; return the run's drift."""
    ref, rows = results[0], results[1:]
    paired = [r for r in rows if r.status == "ok" and r.reference_times_s]
    if ref.status == "ok":
        ref.times_s = ref.times_s + [t for r in paired for t in r.reference_times_s]
    run_drift = None
    if ref.status == "ok" and ref.times_s:
        _summarize(ref, params, grad_reads)
        ref.ratio_to_reference = 1.0
        medians = [r.reference_median_s for r in paired]
        # The reference row's "drift" is the range of its medians over the run (slowest row / fastest row).
        run_drift = max(medians) / min(medians) if len(medians) >= 2 and min(medians) > 0 else None
        ref.reference_drift = run_drift
        for r in paired:
            r.reference_drift = r.reference_median_s / ref.median_s if ref.median_s > 0 else None
    for r in rows:
        if r.status == "ok" and ref.state_bytes:
            r.state_ratio_to_reference = r.state_bytes / ref.state_bytes
    if ref.status == "ok" and ref.state_bytes:
        ref.state_ratio_to_reference = 1.0
    for r in results:
        r.flags = row_flags(r, max_spread, max_drift) if r.status == "ok" else []
    return run_drift


def select_cases(cases: Sequence[BenchCase], only: str | None) -> list[BenchCase]:
    if not only:
        return list(cases)
    patterns = [re.compile(p) for p in only.split(",") if p]
    return [c for c in cases if c.name == REFERENCE or any(p.search(c.name) for p in patterns)]


def _progress_line(i: int, n: int, r: BenchResult) -> str:
    if r.status != "ok":
        return f"[{i}/{n}] {r.name}: {r.status}: {r.error[:80]}"
    ratio = f", x{r.ratio_to_reference:.2f} fused" if r.ratio_to_reference is not None else ""
    spread_text = f", spread {r.spread:.2f}" if r.spread is not None else ""
    return (
        f"[{i}/{n}] {r.name}: {r.median_s * 1e3:.2f} ms{ratio}{spread_text} (first step {r.first_step_s * 1e3:.1f} ms)"
    )


def run(
    size: str = "58m",
    device: str = "cpu",
    threads: int | None = None,
    only: str | None = None,
    warmup: int = 2,
    repeats: int = DEFAULT_REPEATS,
    dtype: str = "float32",
    cases: Sequence[BenchCase] | None = None,
    progress: Callable[[str], None] | None = None,
    max_spread: float = DEFAULT_MAX_SPREAD,
    max_drift: float = DEFAULT_MAX_DRIFT,
    clock: Clock = time.perf_counter,
) -> dict[str, Any]:
    """Run the benchmark and return the JSON-able report (``meta`` + ``results``, the reference first).

    ``clock`` (seconds, monotonic) is what steps are timed with; tests pass a fake one.
    """
    check_limits(max_spread, max_drift)
    if threads is not None:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    params = make_params(size, device=dev, dtype=getattr(torch, dtype))
    pristine_grads = [p.grad.clone() for p in params]
    selected = select_cases(all_cases() if cases is None else cases, only)
    ref_case = next((c for c in selected if c.name == REFERENCE), None) or reference_cases()[0]
    others = [c for c in selected if c.name != REFERENCE]
    say = progress or (lambda msg: print(msg, flush=True))
    numel = sum(p.numel() for p in params)
    threads_now = torch.get_num_threads()
    say(
        f"# {size}: {format_count(numel)} on {dev}, {threads_now} thread{'s' * (threads_now != 1)}; per case: first "
        f"step, {warmup} warm-up + {repeats} timed steps, each paired with a timed step of {REFERENCE}; "
        f"{len(others) + 1} case{'s' * bool(others)}"
    )
    load_start = load_average()
    ref_row, reference = _start_reference(ref_case, params, warmup, 0 if others else repeats, clock)
    results = [ref_row]
    say(
        f"[1/{len(others) + 1}] {REFERENCE}: "
        + (
            f"first step {ref_row.first_step_s * 1e3:.1f} ms"
            if ref_row.status == "ok"
            else f"error: {ref_row.error[:80]}"
        )
    )
    for i, case in enumerate(others, start=2):
        for p, g in zip(params, pristine_grads):  # restore gradients an optimizer may have modified
            p.grad.copy_(g)
        results.append(measure(case, params, warmup, repeats, reference, clock))
        say(_progress_line(i, len(others) + 1, results[-1]))
    del reference
    gc.collect()
    run_drift = _finish(results, params, ref_case.grad_reads, max_spread, max_drift)
    say(HEADER)
    for r in results:
        say(format_row(r))
    if run_drift is not None:
        say(f"# reference drift over the run (slowest / fastest median of its paired steps): {run_drift:.2f}")
    load_end, cpus = load_average(), os.cpu_count() or 1
    for line in footnote(results, max_spread, max_drift) + load_note(load_start, load_end, cpus):
        say(line)
    meta = _meta(size, dev, dtype, warmup, repeats, params, run_drift)
    meta.update(
        max_spread=max_spread,
        max_drift=max_drift,
        paired=True,
        flagged=[r.name for r in results if r.flags],
        load_average=[load_start, load_end],
        cpu_count=cpus,
    )
    return {"meta": meta, "results": [asdict(r) for r in results]}


def _meta(
    size: str, dev: torch.device, dtype: str, warmup: int, repeats: int, params: list[torch.Tensor], drift: float | None
) -> dict[str, Any]:
    import importlib.metadata as md

    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    return {
        "size": size,
        "shape": asdict(SIZES[size]),
        "numel": sum(p.numel() for p in params),
        "dtype": dtype,
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev)
        if dev.type == "cuda"
        else platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "warmup": warmup,
        "repeats": repeats,
        "reference": REFERENCE,
        "reference_drift": drift,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {pkg: version(pkg) for pkg in ("torch", "transformers", "hf-optim")},
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
