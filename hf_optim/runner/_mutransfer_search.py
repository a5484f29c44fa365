"""The choices of ``hf-optim mutransfer``, as pure functions of the recorded rows, so that the report can be recomputed
from ``results.jsonl`` alone (tests/test_mutransfer.py does) and the command and the report cannot disagree.

A *point* is ``(log2_lr, output_mult, attn_mult, weight_decay)``; its score is the mean final validation loss over
the seeds, ``inf`` if any seed diverged. Each stage picks the lowest score among its points and the incumbent (the best
point so far), ties going to the incumbent, then to the earlier point.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

Point = tuple[float, float, float, float]
FIELDS = ("log2_lr", "output_mult", "attn_mult", "weight_decay")


def point_of(row: Mapping[str, Any]) -> Point:
    return tuple(float(row[name]) for name in FIELDS)  # type: ignore[return-value]


def scores(rows: Iterable[Mapping[str, Any]]) -> dict[Point, tuple[float, int]]:
    """Point -> (mean loss over seeds, seeds), in the order the points first appear."""
    losses: dict[Point, list[float]] = {}
    for row in rows:
        loss = math.inf if row["diverged"] or row["val_loss"] is None else float(row["val_loss"])
        losses.setdefault(point_of(row), []).append(loss)
    return {p: (math.fsum(v) / len(v) if all(map(math.isfinite, v)) else math.inf, len(v)) for p, v in losses.items()}


def choose(stage_rows: Sequence[Mapping[str, Any]], incumbent: tuple[Point, float] | None) -> tuple[Point, float]:
    """The best (point, score) of a stage's rows and the incumbent."""
    candidates = list(scores(stage_rows).items())
    best = incumbent
    for point, (score, _) in candidates:
        if best is None or score < best[1]:
            best = (point, score)
    if best is None:
        raise ValueError("a stage with no runs and no incumbent has no best point.")
    return best


def at_edge(grid: Sequence[float], best_log2_lr: float) -> int:
    """-1 / +1 when the best lr is the lowest / highest of the grid (the optimum may lie outside), else 0."""
    if best_log2_lr == min(grid):
        return -1
    if best_log2_lr == max(grid):
        return 1
    return 0


def replay(rows: Sequence[Mapping[str, Any]], stages: Sequence[str]) -> dict[str, Any]:
    """The search's stage-by-stage choices, recomputed from the proxy rows (the report's ``stages`` and optimum)."""
    incumbent: tuple[Point, float] | None = None
    out = []
    for stage in stages:
        stage_rows = [r for r in rows if r["role"] == "proxy" and r["stage"] == stage]
        if not stage_rows:
            continue
        incumbent = choose(stage_rows, incumbent)
        table = [
            {**dict(zip(FIELDS, p, strict=True)), "loss": s, "seeds": n} for p, (s, n) in scores(stage_rows).items()
        ]
        out.append({"stage": stage, "points": table, "best": dict(zip(FIELDS, incumbent[0], strict=True))})
    if incumbent is None:
        raise ValueError("no proxy runs recorded: nothing to transfer.")
    return {"stages": out, "optimum": dict(zip(FIELDS, incumbent[0], strict=True)), "proxy_loss": incumbent[1]}


def direct_summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Best lr of the direct sweep at the target (``None`` without one)."""
    direct = [r for r in rows if r["role"] == "direct"]
    if not direct:
        return None
    table = scores(direct)
    best_point, (best_loss, _) = min(table.items(), key=lambda item: item[1][0])
    return {
        "points": [{"log2_lr": p[0], "loss": s, "seeds": n} for p, (s, n) in table.items()],
        "best_log2_lr": best_point[0],
        "best_loss": best_loss,
    }


def verify_summary(rows: Sequence[Mapping[str, Any]], transferred_log2_lr: float) -> dict[str, Any] | None:
    """The target at the transferred lr and at x0.5 / x2: is the transferred one the best of the three?"""
    verify = [r for r in rows if r["role"] == "verify"]
    if not verify:
        return None
    table = scores(verify)
    by_offset = {f"{2.0 ** (p[0] - transferred_log2_lr):g}x": s for p, (s, _) in table.items()}
    best = min(by_offset, key=by_offset.get)
    return {"loss": by_offset, "best": best, "transferred_is_best": best == "1x"}


def compute(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """FLOPs (6 N D) and measured training seconds of the proxy search and of the direct sweep, and their ratios."""
    out: dict[str, float] = {}
    for role in ("proxy", "direct", "verify"):
        mine = [r for r in rows if r["role"] == role]
        out[f"{role}_flops"] = math.fsum(r["flops"] for r in mine)
        out[f"{role}_seconds"] = round(math.fsum(r["seconds"] for r in mine), 1)
        out[f"{role}_runs"] = len(mine)
    if out["direct_flops"]:
        out["proxy_over_direct_flops"] = out["proxy_flops"] / out["direct_flops"]
        out["proxy_over_direct_seconds"] = out["proxy_seconds"] / out["direct_seconds"]
    return out


def summarize(rows: Sequence[Mapping[str, Any]], stages: Sequence[str]) -> dict[str, Any]:
    """Everything the report states, from the rows alone."""
    search = replay(rows, stages)
    summary: dict[str, Any] = {**search, "compute": compute(rows)}
    direct = direct_summary(rows)
    if direct is not None:
        direct["transfer_gap_grid_steps"] = abs(search["optimum"]["log2_lr"] - direct["best_log2_lr"])
        summary["direct"] = direct
    verify = verify_summary(rows, search["optimum"]["log2_lr"])
    if verify is not None:
        if direct is not None:
            verify["tuned_minus_direct_best"] = verify["loss"]["1x"] - direct["best_loss"]
        summary["verify"] = verify
    return summary
