"""``hf-optim bench``: reliability flags of a row, and the table they are printed in.

A ratio to the reference is only as good as the conditions both were measured in. The benchmark pairs every timed
step of a case with a timed step of the reference (:mod:`hf_optim.bench`); this module judges the result:

* ``S`` (spread): the case's own repeats spread by more than ``max_spread`` (``max / min`` of its step times): the
  machine was busy or the step itself is erratic, and its median is not a stable number.
* ``R`` (reference spread): the reference steps paired with this row spread by more than ``max_spread``: the
  denominator of the ratio is not stable.
* ``D`` (reference drift): the reference's median during this row differs from its median over the whole run by more
  than ``max_drift`` (either way): the machine changed while this row ran, so its absolute times are not comparable
  with the other rows' (its ratio, measured in pairs, is the better number).

The reference's own row gets ``S`` from all its steps and ``D`` when its row medians range over more than
``max_drift``. A flag needs two or more repeats (one time has no spread).
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from typing import Any

#: Defaults of ``--max-spread`` / ``--max-drift``. In five quiet runs of the 58M set (docs/benchmarks/, 160 rows of 7
#: repeats) a row's max/min was 1.02 at the median and 1.13 at most, and the reference moved by at most 4 % over a
#: run; a factor of 1.5 (1.25 for drift) means something else competed for the cores or the memory bus.
DEFAULT_MAX_SPREAD = 1.5
DEFAULT_MAX_DRIFT = 1.25

FLAG_CODES = {"spread": "S", "reference-spread": "R", "reference-drift": "D"}


def spread(times: Sequence[float]) -> float | None:
    """``max / min`` of the step times (None for fewer than two, inf when the fastest took no time at all)."""
    if len(times) < 2:
        return None
    fastest = min(times)
    return max(times) / fastest if fastest > 0 else float("inf")


def paired_ratio(times: Sequence[float], reference_times: Sequence[float]) -> float | None:
    """Median over repeats of ``case_i / reference_i``: each ratio compares two steps taken back to back."""
    if not times or len(times) != len(reference_times):
        return None
    ratios = [t / r for t, r in zip(times, reference_times) if r > 0]
    return statistics.median(ratios) if ratios else None


def row_flags(row: Any, max_spread: float, max_drift: float) -> list[str]:
    """The flag names (keys of :data:`FLAG_CODES`) a result row earns."""
    flags = []
    if row.spread is not None and row.spread > max_spread:
        flags.append("spread")
    if row.reference_spread is not None and row.reference_spread > max_spread:
        flags.append("reference-spread")
    drift = row.reference_drift
    if drift is not None and drift > 0 and max(drift, 1 / drift) > max_drift:
        flags.append("reference-drift")
    return flags


def check_limits(max_spread: float, max_drift: float) -> None:
    for name, value in (("max_spread", max_spread), ("max_drift", max_drift)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 1.0:
            raise ValueError(f"{name} must be a number >= 1 (a ratio of step times), got {value!r}.")


# ----------------------------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------------------------
HEADER = (
    f"{'optimizer':52s} {'median ms':>10s} {'x fused':>7s} {'first ms':>10s} {'state MiB':>9s} "
    f"{'xstate':>6s} {'B/p':>5s} {'GB/s':>6s} {'spread':>6s} flags"
)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_row(r: Any) -> str:
    if r.status != "ok":
        return f"{r.name:52s} {r.status.upper()}: {r.error[:100]}"
    median_ms = r.median_s * 1e3 if r.median_s is not None else None
    first_ms = r.first_step_s * 1e3 if r.first_step_s is not None else None
    state_mib = r.state_bytes / 2**20 if r.state_bytes is not None else None
    codes = "".join(FLAG_CODES[f] for f in r.flags)
    return (
        f"{r.name:52s} {_fmt(median_ms, '10.2f')} {_fmt(r.ratio_to_reference, '7.2f')} "
        f"{_fmt(first_ms, '10.1f')} {_fmt(state_mib, '9.1f')} {_fmt(r.state_ratio_to_reference, '6.3f')} "
        f"{_fmt(r.bytes_per_param, '5.1f')} {_fmt(r.gbytes_per_s, '6.1f')} {_fmt(r.spread, '6.2f')} "
        f"{'!' + codes if codes else ''}"
    )


def footnote(rows: Sequence[Any], max_spread: float, max_drift: float) -> list[str]:
    """Lines under the table: what the flags mean, printed only when a row carries one."""
    flagged = [r for r in rows if r.status == "ok" and r.flags]
    if not flagged:
        return []
    return [
        f"# ! {len(flagged)} of {sum(r.status == 'ok' for r in rows)} rows are unreliable (busy or changing machine):",
        f"#   S = its repeats spread by more than {max_spread:g}x (max/min, column 'spread');",
        f"#   R = the reference's steps paired with it spread by more than {max_spread:g}x;",
        f"#   D = the reference's median during the row was more than {max_drift:g}x off its median over the run.",
        "#   'x fused' comes from back-to-back pairs and is the more robust number; rerun on a quiet machine",
        "#   (or with more --repeats) before quoting the others.",
    ]


def load_average() -> float | None:
    """The 1-minute load average (None where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def load_note(start: float | None, end: float | None, cpus: int) -> list[str]:
    """A line under the table when the machine had more runnable work than CPUs at the start or the end of the run.

    Flags catch unstable timings; a load that stays high slows every step steadily and goes unflagged, and it does not
    slow every optimizer alike (memory-bound steps share the bus), so even paired ratios move.
    """
    loads = [x for x in (start, end) if x is not None]
    if not loads or max(loads) <= cpus:
        return []
    shown = ", ".join(f"{x:.1f}" for x in loads)
    line = (
        f"# ! load average {shown} (start, end) on {cpus} CPUs: other work competed with every step; times and "
        "ratios are not comparable with a quiet machine's."
    )
    return [line]


def format_count(numel: int) -> str:
    """``58,412,544 params (58.4M)``; small sets show the exact count rather than ``0.0M``."""
    return f"{numel:,} params" + (f" ({numel / 1e6:.1f}M)" if numel >= 10**6 else "")
