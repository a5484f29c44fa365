"""``hf-optim bench``: optimizer step time, state bytes and effective bandwidth against fused AdamW.

The reference is ``torch.optim.AdamW(fused=True)``.

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
import json
import re
from collections.abc import Sequence

import torch

from .cases import REFERENCE, all_cases
from .params import SIZES
from .report import DEFAULT_MAX_DRIFT, DEFAULT_MAX_SPREAD
from .steps import DEFAULT_REPEATS, BenchResult, measure, run, select_cases

__all__ = ["REFERENCE", "SIZES", "BenchResult", "all_cases", "main", "measure", "run"]


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
        for case in select_cases(all_cases(), args.only):
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
        rows = memory.measure(select_cases(all_cases(), args.only), args.size, device, args.dtype)
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
