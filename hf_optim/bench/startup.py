"""``hf-optim bench-startup``: what the ``.pth`` import hook adds to the start of every Python process.

The hook must stay invisible to interpreters that never train anything (target: at most 5 ms added to
``python -c pass``). Fresh interpreters are timed in alternating pairs that differ only in the site directory they
process: one holds a copy of ``hf_optim_autoload.pth``, the other is empty. ``-S`` skips the normal site
processing in both, so an installed copy of the ``.pth`` does not run in the baseline too. Two workloads: an empty
program (the line's own cost) and one that imports a dozen standard-library modules (the trampoline is asked about
every later import, so that overhead shows there). The report is the difference of medians, with the spread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PTH = Path(__file__).resolve().parents[1] / "hf_optim_autoload.pth"
TARGET_MS = 5.0
WORKLOADS = {
    "empty": "pass",
    "stdlib imports": "import json, decimal, email.mime.text, http.client, xml.etree.ElementTree, argparse, "
    "logging, dataclasses, typing, pathlib, csv, sqlite3",
}


def _program(sitedir: Path, workload: str) -> str:
    return f"import site; site.addsitedir({str(sitedir)!r}); {workload}"


def _time_once(python: str, code: str) -> float:
    start = time.perf_counter()
    subprocess.run([python, "-S", "-c", code], check=True)
    return time.perf_counter() - start


def new_modules(sitedir: Path, python: str = sys.executable) -> list[str]:
    """Modules that processing ``sitedir`` imports in a fresh interpreter (the hook's must be none)."""
    code = (
        "import site, sys; before = set(sys.modules); "
        f"site.addsitedir({str(sitedir)!r}); print(sorted(set(sys.modules) - before))"
    )
    out = subprocess.run([python, "-S", "-c", code], check=True, capture_output=True, text=True).stdout
    return json.loads(out.replace("'", '"'))


def measure(runs: int = 40, python: str = sys.executable, progress: bool = False) -> dict[str, Any]:
    """Median start-up time with and without the hook, per workload, from ``runs`` alternating pairs."""
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}.")
    with tempfile.TemporaryDirectory() as tmp:
        empty, hooked = Path(tmp, "empty"), Path(tmp, "hooked")
        empty.mkdir()
        hooked.mkdir()
        (hooked / PTH.name).write_text(PTH.read_text())
        report: dict[str, Any] = {
            "python": python,
            "runs": runs,
            "target_ms": TARGET_MS,
            "modules_imported_by_hook": new_modules(hooked, python),
            "workloads": {},
        }
        for name, workload in WORKLOADS.items():
            base, hook = [], []
            for i in range(runs):
                # alternate the order within a pair so that a drift of the machine hits both arms alike
                arms = [(base, empty), (hook, hooked)] if i % 2 == 0 else [(hook, hooked), (base, empty)]
                for times, sitedir in arms:
                    times.append(_time_once(python, _program(sitedir, workload)))
                if progress and (i + 1) % 10 == 0:
                    print(f"  {name}: {i + 1}/{runs} pairs", file=sys.stderr, flush=True)
            added = [1e3 * (h - b) for h, b in zip(hook, base)]
            report["workloads"][name] = {
                "baseline_ms": 1e3 * statistics.median(base),
                "with_hook_ms": 1e3 * statistics.median(hook),
                "added_ms": 1e3 * (statistics.median(hook) - statistics.median(base)),
                "added_ms_pairwise_median": statistics.median(added),
                "added_ms_pairwise_iqr": _iqr(added),
            }
    return report


def _iqr(values: list[float]) -> float:
    if len(values) < 4:
        return float("nan")
    q = statistics.quantiles(values, n=4)
    return q[2] - q[0]


def format_report(report: dict[str, Any]) -> str:
    lines = [
        f"# .pth start-up cost: {report['runs']} alternating pairs of fresh `{report['python']} -S` processes",
        f"# modules the hook imports at start-up: {report['modules_imported_by_hook'] or 'none'}",
        f"{'workload':16s} {'baseline ms':>12s} {'with hook ms':>13s} {'added ms':>9s} {'pairwise':>9s} {'IQR':>6s}",
    ]
    for name, row in report["workloads"].items():
        lines.append(
            f"{name:16s} {row['baseline_ms']:12.2f} {row['with_hook_ms']:13.2f} {row['added_ms']:9.3f} "
            f"{row['added_ms_pairwise_median']:9.3f} {row['added_ms_pairwise_iqr']:6.2f}"
        )
    worst = max(row["added_ms_pairwise_median"] for row in report["workloads"].values())
    verdict = "within" if worst <= report["target_ms"] else "ABOVE"
    lines.append(f"# worst added cost {worst:.3f} ms: {verdict} the {report['target_ms']:g} ms target")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-optim bench-startup", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=40, help="alternating pairs per workload (default 40)")
    parser.add_argument("--python", default=sys.executable, help="interpreter to time (default: this one)")
    parser.add_argument("--json", dest="json_path", help="also write the report to this JSON file")
    args = parser.parse_args(argv)
    report = measure(args.runs, args.python, progress=True)
    print(format_report(report))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report, indent=2))
        print(f"# wrote {args.json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
