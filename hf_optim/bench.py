"""``hf-optim bench``: optimizer step time, state bytes and effective bandwidth against ``torch.optim.AdamW(fused=True)``.

Method (details and results in ``docs/benchmarks.md``):

* Parameters are plain tensors with the shapes of a LLaMA decoder (:mod:`hf_optim._bench_params`) and fixed random
  gradients; every optimizer is stepped on the same tensors, one optimizer at a time (its state is freed after).
* Per optimizer: the first step is timed on its own (state allocation, compilation), then ``--warmup`` untimed steps,
  then ``--repeats`` individually timed steps; the median is reported. The reference (fused AdamW) is measured first
  *and* last; its median over both runs is the denominator of every ratio, so ratios come from the same run.
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
import platform
import re
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ._bench_params import SIZES, make_params

REFERENCE = "torch_adamw_fused"
DEFAULT_REPEATS = 5


@dataclass(frozen=True)
class BenchCase:
    """One optimizer configuration: ``build(params)`` returns a ``torch.optim.Optimizer``."""

    name: str
    build: Callable[[list[torch.Tensor]], torch.optim.Optimizer]
    grad_reads: int = 1  # how many times the rule must stream the gradient (byte model)
    kwargs: dict[str, Any] = field(default_factory=dict)


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
    ratio_to_reference: float | None = None
    state_ratio_to_reference: float | None = None


# ----------------------------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------------------------
#: Short names for knobs in case names (``adamw_v2[coupled,wd=0.1,eps=tf]/fused``); a value alone for modes/presets.
_LABELS = {"weight_decay_mode": "", "preset": "", "weight_decay": "wd=", "eps_mode": "eps=", "beta1": "beta1=",
           "momentum_dtype": "m="}


def _ours(spec_name: str, implementation: str, grad_reads: int = 1, **kwargs: Any) -> BenchCase:
    from .registry import get_spec

    spec = get_spec(spec_name)
    full = {**spec.defaults, **kwargs, "implementation": implementation}
    label = ",".join(f"{_LABELS.get(k, k + '=')}{v}" for k, v in kwargs.items())
    name = f"{spec_name}[{label}]/{implementation}" if label else f"{spec_name}/{implementation}"
    return BenchCase(name, lambda params: spec.resolve()(params, **full), grad_reads, full)


def _implementations(spec_name: str) -> tuple[str, ...]:
    from .registry import get_spec

    try:
        return ("auto", *get_spec(spec_name).resolve().implementations)
    except Exception:  # noqa: BLE001 - a module not written yet still gets a (missing) row
        return ("auto",)


def reference_cases() -> list[BenchCase]:
    """torch's and transformers' optimizers, the yardsticks."""

    def hf_adafactor(params: list[torch.Tensor]) -> torch.optim.Optimizer:
        from transformers.optimization import Adafactor

        # The Trainer's configuration for `--optim adafactor`.
        return Adafactor(params, lr=1e-3, relative_step=False, scale_parameter=False, warmup_init=False)

    return [
        BenchCase(REFERENCE, lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.1, fused=True), 1,
                  {"fused": True}),
        BenchCase("torch_adamw_foreach", lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.1, foreach=True), 1,
                  {"foreach": True}),
        BenchCase("torch_adafactor_foreach", lambda p: torch.optim.Adafactor(p, lr=1e-2, foreach=True), 2,
                  {"foreach": True}),
        BenchCase("hf_adafactor", hf_adafactor, 2, {"relative_step": False, "scale_parameter": False}),
    ]


def our_cases() -> list[BenchCase]:
    """Every registered optimizer, the Adam weight-decay × eps modes, the Adafactor presets, every implementation."""
    from .registry import list_optimizers

    wd_for_mode = {"l2": 0.1, "coupled": 0.1, "independent": 1e-4, "corrected": 0.1}
    cases: list[BenchCase] = []
    for spec in list_optimizers():
        for impl in _implementations(spec.name):
            if spec.name in ("adamw_v2", "adam_v2"):
                for mode, wd in wd_for_mode.items():
                    for eps_mode in ("torch", "tf"):
                        cases.append(_ours(spec.name, impl, weight_decay_mode=mode, weight_decay=wd,
                                           eps_mode=eps_mode))
            elif "adafactor" in spec.name:
                for preset in ("adafactor_v2", "hf", "torch", "palm", "t5"):
                    cases.append(_ours(spec.name, impl, 2, preset=preset))
                cases.append(_ours(spec.name, impl, 2, preset="adafactor_v2", beta1=None))
                cases.append(_ours(spec.name, impl, 2, preset="adafactor_v2", momentum_dtype="float32"))
                cases.append(_ours(spec.name, impl, 2, preset="hf", beta1=0.9))
            else:
                cases.append(_ours(spec.name, impl))
    return cases


def all_cases() -> list[BenchCase]:
    return reference_cases() + our_cases()


# ----------------------------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------------------------
def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer state (0-d step counters included)."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_step(optimizer: torch.optim.Optimizer, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    optimizer.step()
    _sync(device)
    return time.perf_counter() - start


def measure(case: BenchCase, params: list[torch.Tensor], warmup: int, repeats: int) -> BenchResult:
    """Time one case on ``params``; errors become a result row (``status`` missing/error)."""
    result = BenchResult(case.name, kwargs={k: repr(v) if not isinstance(v, (int, float, str, bool, type(None)))
                                            else v for k, v in case.kwargs.items()})
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
            result.first_step_s = _timed_step(optimizer, device)
            for _ in range(warmup):
                optimizer.step()
            result.times_s = [_timed_step(optimizer, device) for _ in range(repeats)]
    except Exception as exc:  # noqa: BLE001 - a broken optimizer must show up in the table, not stop the run
        result.status, result.error = "error", f"{type(exc).__name__}: {exc}"[:300]
        return result
    finally:
        if optimizer is not None:
            result.state_bytes = state_bytes(optimizer) if result.status == "ok" else None
        del optimizer
        gc.collect()
    result.median_s = statistics.median(result.times_s)
    result.min_s = min(result.times_s)
    numel = sum(p.numel() for p in params)
    elem = params[0].element_size()
    moved = 2 * numel * elem + case.grad_reads * numel * elem + 2 * (result.state_bytes or 0)
    result.bytes_per_param = moved / numel
    result.gbytes_per_s = moved / result.median_s / 1e9 if result.median_s > 0 else None
    return result


def _selected(cases: Sequence[BenchCase], only: str | None) -> list[BenchCase]:
    if not only:
        return list(cases)
    patterns = [re.compile(p) for p in only.split(",") if p]
    return [c for c in cases if c.name == REFERENCE or any(p.search(c.name) for p in patterns)]


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_row(r: BenchResult) -> str:
    if r.status != "ok":
        return f"{r.name:52s} {r.status.upper()}: {r.error[:100]}"
    median_ms = r.median_s * 1e3 if r.median_s is not None else None
    first_ms = r.first_step_s * 1e3 if r.first_step_s is not None else None
    state_mib = r.state_bytes / 2**20 if r.state_bytes is not None else None
    return (f"{r.name:52s} {_fmt(median_ms, '10.2f')} {_fmt(r.ratio_to_reference, '7.2f')} "
            f"{_fmt(first_ms, '10.1f')} {_fmt(state_mib, '9.1f')} {_fmt(r.state_ratio_to_reference, '6.3f')} "
            f"{_fmt(r.bytes_per_param, '5.1f')} {_fmt(r.gbytes_per_s, '6.1f')}")


HEADER = (f"{'optimizer':52s} {'median ms':>10s} {'x fused':>7s} {'first ms':>10s} {'state MiB':>9s} "
          f"{'xstate':>6s} {'B/p':>5s} {'GB/s':>6s}")


def run(size: str = "58m", device: str = "cpu", threads: int | None = None, only: str | None = None,
        warmup: int = 2, repeats: int = DEFAULT_REPEATS, dtype: str = "float32",
        cases: Sequence[BenchCase] | None = None, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the benchmark and return the JSON-able report (``meta`` + ``results``)."""
    if threads is not None:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    params = make_params(size, device=dev, dtype=getattr(torch, dtype))
    pristine_grads = [p.grad.clone() for p in params]
    selected = _selected(all_cases() if cases is None else cases, only)
    ref_case = next((c for c in selected if c.name == REFERENCE), None) or reference_cases()[0]
    order = [ref_case, *[c for c in selected if c.name != REFERENCE], ref_case]
    say = progress or (lambda msg: print(msg, flush=True))
    say(f"# {size}: {sum(p.numel() for p in params) / 1e6:.1f}M params on {dev}, {torch.get_num_threads()} threads, "
        f"{warmup} warm-up + {repeats} timed steps; {len(order)} runs")
    results: list[BenchResult] = []
    for i, case in enumerate(order):
        for p, g in zip(params, pristine_grads):  # restore gradients an optimizer may have modified
            p.grad.copy_(g)
        results.append(measure(case, params, warmup, repeats))
        r = results[-1]
        say(f"[{i + 1}/{len(order)}] {case.name}: " + (f"{r.median_s * 1e3:.2f} ms (first step "
            f"{r.first_step_s * 1e3:.1f} ms)" if r.status == "ok" else f"{r.status}: {r.error[:80]}"))
    first_ref, last_ref = results[0], results.pop()
    drift = (last_ref.median_s / first_ref.median_s
             if last_ref.status == "ok" and first_ref.status == "ok" else None)
    # The reference's median pools its first and last run: slow drift of a shared machine hits both sides.
    ref_times = first_ref.times_s + last_ref.times_s
    ref_median = statistics.median(ref_times) if first_ref.status == "ok" and ref_times else None
    if ref_median is not None:
        first_ref.median_s, first_ref.times_s = ref_median, ref_times
        first_ref.min_s = min(ref_times)
    for r in results:
        if r.status == "ok" and ref_median:
            r.ratio_to_reference = r.median_s / ref_median
            r.state_ratio_to_reference = r.state_bytes / first_ref.state_bytes if first_ref.state_bytes else None
            r.gbytes_per_s = r.bytes_per_param * sum(p.numel() for p in params) / r.median_s / 1e9
    say(HEADER)
    for r in results:
        say(format_row(r))
    if drift is not None:
        say(f"# reference drift (last run / first run): {drift:.2f}")
    return {"meta": _meta(size, dev, dtype, warmup, repeats, params, drift), "results": [asdict(r) for r in results]}


def _meta(size: str, dev: torch.device, dtype: str, warmup: int, repeats: int, params: list[torch.Tensor],
          drift: float | None) -> dict[str, Any]:
    import importlib.metadata as md

    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    return {
        "size": size, "shape": asdict(SIZES[size]), "numel": sum(p.numel() for p in params), "dtype": dtype,
        "device": str(dev), "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else
        platform.processor() or platform.machine(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(), "warmup": warmup, "repeats": repeats, "reference": REFERENCE,
        "reference_drift": drift, "python": platform.python_version(), "platform": platform.platform(),
        "versions": {pkg: version(pkg) for pkg in ("torch", "transformers", "hf-optim")},
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-optim bench", description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="58m", help="parameter set (default 58m)")
    parser.add_argument("--device", default=None, help="cpu (default) or cuda[:N]; default cuda when present")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's default)")
    parser.add_argument("--only", default=None,
                        help="comma-separated regexes on case names (fused AdamW, the reference, always runs)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after the first (default 2)")
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, help="timed steps (default 5)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--json", dest="json_path", default=None, help="also write the report to this JSON file")
    parser.add_argument("--list", action="store_true", help="print the case names and exit")
    args = parser.parse_args(argv)
    if args.list:
        for case in _selected(all_cases(), args.only):
            print(case.name)
        return 0
    if args.repeats < 1 or args.warmup < 0 or (args.threads is not None and args.threads < 1):
        parser.error("--repeats and --threads must be >= 1 and --warmup >= 0")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    report = run(args.size, device, args.threads, args.only, args.warmup, args.repeats, args.dtype)
    failed = [r["name"] for r in report["results"] if r["status"] != "ok"]
    if failed:
        print(f"# {len(failed)} case(s) did not run: see the rows marked MISSING / ERROR")
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=1)
        print(f"# wrote {args.json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
