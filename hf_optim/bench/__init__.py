"""``hf-optim bench``: optimizer step time, state bytes and effective bandwidth against ``torch.optim.AdamW(fused=True)``.

Method (details and results in ``docs/benchmarks.md``):

* Parameters are plain tensors with the shapes of a LLaMA decoder (:mod:`hf_optim.bench.params`) and fixed random
  gradients; every optimizer is stepped on the same tensors, one optimizer at a time (its state is freed after).
* Per optimizer: the first step is timed on its own (state allocation, compilation), then ``--warmup`` untimed steps,
  then ``--repeats`` individually timed steps, each paired with a timed step of the reference (fused AdamW, built
  once and kept for the whole run), the order within a pair alternating. The median is reported; the ratio to the
  reference is the median of the per-pair ratios, so both sides of every ratio ran under the same load.
* Reliability (:mod:`hf_optim.bench.report`): a row whose repeats (or paired reference steps) spread by more than
  ``--max-spread``, or during which the reference's median was more than ``--max-drift`` off its median over the run,
  is flagged in the table (``!S``, ``!R``, ``!D``) and explained under it.
* Bytes moved per step (a lower bound on memory traffic):
  ``2·param_bytes + grad_reads·grad_bytes + 2·state_bytes`` (read and write parameters and state, read the gradient
  ``grad_reads`` times: 1 for one-pass rules such as Adam, 2 for factored Adafactor, whose statistics must be complete
  before the update pass). fp32 AdamW: 8 + 4 + 16 = 28 B/param; factored Adafactor without momentum ≈ 8 + 8 = 16.
* A missing optimizer (not importable) or one that raises is reported as a row with its error, never a crash.
"""

from __future__ import annotations

import argparse
import gc
import json
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


def _selected(cases: Sequence[BenchCase], only: str | None) -> list[BenchCase]:
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
    selected = _selected(all_cases() if cases is None else cases, only)
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-optim bench", description=__doc__.split("\n")[0].replace("``", ""))
    parser.add_argument("--size", choices=sorted(SIZES), default="58m", help="parameter set (default 58m)")
    parser.add_argument(
        "--device", default=None, help="cpu, cuda or cuda:N (default: cuda when torch sees a GPU, else cpu)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's default)")
    parser.add_argument(
        "--only", default=None, help="comma-separated regexes on case names (fused AdamW, the reference, always runs)"
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after the first (default 2)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=DEFAULT_REPEATS,
        help=f"timed steps per case, each paired with a reference step (default {DEFAULT_REPEATS})",
    )
    parser.add_argument(
        "--max-spread",
        type=float,
        default=DEFAULT_MAX_SPREAD,
        help="flag a row (S, R) whose repeats or paired reference steps spread by more than this "
        f"factor, max/min (default {DEFAULT_MAX_SPREAD})",
    )
    parser.add_argument(
        "--max-drift",
        type=float,
        default=DEFAULT_MAX_DRIFT,
        help="flag a row (D) whose paired reference median is more than this factor off the "
        f"reference's median over the run (default {DEFAULT_MAX_DRIFT})",
    )
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--json", dest="json_path", default=None, help="also write the report to this JSON file")
    parser.add_argument("--list", action="store_true", help="print the case names and exit")
    parser.add_argument(
        "--memory",
        action="store_true",
        help="instead of timing: exact state bytes and the measured peak memory of one step per case "
        "(CPU: one process per case, peak RSS; CUDA: the allocator's peak)",
    )
    return parser


def _check_only(parser: argparse.ArgumentParser, only: str | None) -> None:
    for pattern in (only or "").split(","):
        try:
            re.compile(pattern)
        except re.error as error:
            parser.error(f"--only: {pattern!r} is not a regular expression ({error})")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _check_only(parser, args.only)
    if args.list:
        for case in _selected(all_cases(), args.only):
            print(case.name)
        return 0
    if args.repeats < 1 or args.warmup < 0 or (args.threads is not None and args.threads < 1):
        parser.error(
            f"--repeats ({args.repeats}) and --threads ({args.threads}) must be >= 1 and --warmup ({args.warmup}) >= 0"
        )
    if not (args.max_spread >= 1 and args.max_drift >= 1):  # also refuses nan
        parser.error(
            f"--max-spread ({args.max_spread}) and --max-drift ({args.max_drift}) are ratios of step "
            "times and must be >= 1"
        )
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        torch.device(device)
    except RuntimeError:
        parser.error(f"--device {device!r} is not a device; use cpu, cuda or cuda:N")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {device!r}: torch sees no CUDA device here; use --device cpu")
    if args.memory:
        from . import memory

        print(memory.header(args.size, device))
        rows = memory.measure(_selected(all_cases(), args.only), args.size, device, args.dtype)
        if args.json_path:
            with open(args.json_path, "w", encoding="utf-8") as fh:
                json.dump({"meta": {"size": args.size, "device": device, "dtype": args.dtype}, "memory": rows}, fh)
        return 0
    report = run(
        args.size,
        device,
        args.threads,
        args.only,
        args.warmup,
        args.repeats,
        args.dtype,
        max_spread=args.max_spread,
        max_drift=args.max_drift,
    )
    failed = [r["name"] for r in report["results"] if r["status"] != "ok"]
    if failed:
        print(f"# {len(failed)} case(s) did not run: see the rows marked MISSING / ERROR")
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=1)
        print(f"# wrote {args.json_path}")
    return 0
