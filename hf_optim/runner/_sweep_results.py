"""Sweep results: an append-only JSON-lines log (the resume point), CSV/JSON tables, and the optimum analysis.

Analysis conventions (used by the plots and the write-up): a cell's score is its final validation loss; seeds are
averaged (a diverged seed makes the mean ``inf``); the best learning rate of a curve is the arg-min over the lr grid;
"grid steps" are indices in the sorted lr (or weight-decay) grid. A λ = 0 run is the same in every decay mode, so the
config expands it once (as ``coupled``) and :func:`heatmaps` shows it in every mode's heat-map of the same family.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

from hf_optim.decay import decay_rate

from ._sweep_config import DEFAULT_OPTIMIZER, Cell

COLUMNS = [
    "key",
    "grid",
    "optimizer",
    "optimizer_args",
    "parametrization",
    "width",
    "layers",
    "lr",
    "log2_lr",
    "weight_decay_mode",
    "weight_decay",
    "wd_rule",
    "seed",
    "train_loss",
    "val_loss",
    "diverged",
    "steps_done",
    "n_params",
    "seconds",
    "device",
]


def optimizer_label(row: dict[str, Any]) -> str:
    """``adamw_v2``, or ``sgdw_v2(momentum=0.9)`` when the entry fixed constructor arguments."""
    args = row.get("optimizer_args") or []
    name = row.get("optimizer", DEFAULT_OPTIMIZER)
    return f"{name}({','.join(f'{k}={v}' for k, v in args)})" if args else name


def row_for(cell: Cell, result: dict[str, Any]) -> dict[str, Any]:
    row = {k: v for k, v in asdict(cell).items() if k not in ("model", "train")}
    row["log2_lr"] = round(math.log2(cell.lr), 6)
    row["settings"] = {"model": asdict(cell.model), "train": asdict(cell.train)}
    row.update(result)
    return row


class ResultStore:
    """``results.jsonl`` grows by one line per finished cell; ``results.csv``/``results.json`` are rewritten."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        self.log = out_dir / "results.jsonl"
        self.rows: dict[str, dict[str, Any]] = {}
        if self.log.exists():
            for line in self.log.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    # Rows logged before the optimizer axis existed were all the default AdamW.
                    row.setdefault("optimizer", DEFAULT_OPTIMIZER)
                    row.setdefault("optimizer_args", [])
                    self.rows[row["key"]] = row

    def done(self, key: str) -> bool:
        return key in self.rows

    def add(self, row: dict[str, Any]) -> None:
        line = json.dumps(row, allow_nan=True)
        # Keep the row as a resume will read it back (tuples become lists), so tables do not depend on whether a
        # row was run in this process or loaded from the log.
        self.rows[row["key"]] = json.loads(line)
        with self.log.open("a") as f:
            f.write(line + "\n")

    def write_tables(self, keys: list[str] | None = None) -> list[dict[str, Any]]:
        """Write CSV and JSON for ``keys`` (default: every row), sorted for reading; returns the rows."""
        rows = [self.rows[k] for k in (keys if keys is not None else self.rows) if k in self.rows]
        rows.sort(
            key=lambda r: (
                r["grid"],
                optimizer_label(r),
                r["parametrization"],
                r["weight_decay_mode"],
                r["width"],
                r["weight_decay"],
                r["lr"],
                r["seed"],
            )
        )
        with (self.out_dir / "results.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows({**r, "layers": r.get("settings", {}).get("model", {}).get("layers")} for r in rows)
        # JSON cannot hold NaN portably: diverged losses become null.
        clean = [
            {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()} for r in rows
        ]
        (self.out_dir / "results.json").write_text(json.dumps(clean, indent=1) + "\n")
        return rows


def _mean_score(rows: list[dict[str, Any]], metric: str) -> float:
    values = [r[metric] for r in rows]
    if any(v is None or not math.isfinite(v) for v in values):
        return math.inf
    return sum(values) / len(values)


def curves(rows: list[dict[str, Any]], metric: str = "val_loss") -> dict[tuple, dict[int, dict[float, float]]]:
    """``{(grid, optimizer, parametrization, mode, wd): {width: {lr: seed-mean loss}}}``."""
    cells: dict[tuple, list] = defaultdict(list)
    for r in rows:
        cells[
            (
                r["grid"],
                optimizer_label(r),
                r["parametrization"],
                r["weight_decay_mode"],
                r["weight_decay"],
                r["width"],
                r["lr"],
            )
        ].append(r)
    out: dict[tuple, dict[int, dict[float, float]]] = defaultdict(lambda: defaultdict(dict))
    for (grid, opt, param, mode, wd, width, lr), group in cells.items():
        out[(grid, opt, param, mode, wd)][width][lr] = _mean_score(group, metric)
    return out


def _lr_wd_cells(rows: list[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    """Rows grouped by ``(grid, optimizer, parametrization, width, mode, wd, lr)``; a λ = 0 row also joins every
    mode of its family that has decayed rows but no λ = 0 rows of its own (results recorded before λ = 0 was shared
    keep their own)."""

    def family(r: dict[str, Any]) -> tuple:
        return r["grid"], optimizer_label(r), r["parametrization"], r["width"]

    modes: dict[tuple, set[str]] = defaultdict(set)
    own_zero: set[tuple] = set()
    for r in rows:
        if r["weight_decay"] > 0:
            modes[family(r)].add(r["weight_decay_mode"])
        else:
            own_zero.add((family(r), r["weight_decay_mode"]))
    cells: dict[tuple, list] = defaultdict(list)
    for r in rows:
        targets = {r["weight_decay_mode"]}
        if r["weight_decay"] == 0:
            targets |= {m for m in modes[family(r)] if (family(r), m) not in own_zero}
        for mode in targets:
            cells[(*family(r), mode, r["weight_decay"], r["lr"])].append(r)
    return cells


def heatmaps(rows: list[dict[str, Any]], metric: str = "val_loss") -> dict[tuple, dict[float, dict[float, float]]]:
    """``{(grid, optimizer, parametrization, width, mode): {wd: {lr: seed-mean loss}}}`` (>= 2 weight decays)."""
    cells = _lr_wd_cells(rows)
    out: dict[tuple, dict[float, dict[float, float]]] = defaultdict(lambda: defaultdict(dict))
    for (grid, opt, param, width, mode, wd, lr), group in cells.items():
        out[(grid, opt, param, width, mode)][wd][lr] = _mean_score(group, metric)
    return {k: v for k, v in out.items() if len(v) >= 2}


def _argmin(values: dict[float, float]) -> float:
    return min(values, key=lambda x: (values[x], x))


def _best_wd_per_seed(rows: list[dict[str, Any]], key: tuple, metric: str) -> dict[str, dict[str, float]]:
    """``{seed: {log2 lr: best λ}}`` for one heat-map (each seed on its own: how robust the seed-mean optimum is)."""
    per_seed: dict[int, dict[float, dict[float, float]]] = defaultdict(lambda: defaultdict(dict))
    for (grid, opt, param, width, mode, wd, lr), group in _lr_wd_cells(rows).items():
        if (grid, opt, param, width, mode) == key:
            for r in group:
                value = r[metric]
                per_seed[r["seed"]][lr][wd] = value if value is not None and math.isfinite(value) else math.inf
    return {
        str(seed): {f"{math.log2(lr):g}": _argmin(by_wd) for lr, by_wd in sorted(by_lr.items())}
        for seed, by_lr in sorted(per_seed.items())
    }


def _slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys on xs (NaN with fewer than 2 distinct xs or any non-finite y)."""
    if len(set(xs)) < 2 or not all(math.isfinite(y) for y in ys):
        return math.nan
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def _vertex(points: list[tuple[float, float]], at: int) -> float:
    """log2 d of the minimum of a least-squares parabola through the (up to) 5 points around index ``at`` (the
    argmin); the argmin itself when the fit is not convex or its vertex leaves the fitted range (an optimum on the
    edge of the grid is not extrapolated)."""
    import numpy as np

    window = points[max(0, at - 2) : at + 3]
    xs, ys = [x for x, _ in window], [y for _, y in window]
    if len(window) < 3 or not all(math.isfinite(y) for y in ys):
        return points[at][0]
    a, b, _ = np.polyfit(xs, ys, 2)
    vertex = -b / (2 * a) if a > 0 else math.nan
    return float(vertex) if min(xs) <= vertex <= max(xs) else points[at][0]


def per_step_decay(rows: list[dict[str, Any]], metric: str = "val_loss") -> list[dict[str, Any]]:
    """The LR x WD surface in the coordinate where the decoupled modes are one update rule: the per-step decay at the
    peak lr, d = α·λ (``coupled``) or λ (``independent``). For each (grid, optimizer, parametrization, width) with
    both modes, every decayed cell of both modes becomes a point (log2 d, seed-mean loss) of its lr; where the two
    grids give the same d the two cells (identical runs up to rounding) are averaged. Per lr: the argmin log2 d* and
    the vertex of a parabola through the 5 points around it (sub-grid); then the least-squares slope of log2 d*
    against log2 lr: 0 = the best per-step decay is lr-free (independent λ* flat, coupled λ* ∝ 1/lr), 1 = the best
    coupled λ is lr-free (independent λ* ∝ lr)."""
    points: dict[tuple, dict[float, dict[float, list[float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    modes: dict[tuple, set[str]] = defaultdict(set)
    for (grid, opt, param, width, mode, wd, lr), group in _lr_wd_cells(rows).items():
        if wd > 0 and mode in ("coupled", "independent"):
            family = (grid, opt, param, width)
            modes[family].add(mode)
            log2_d = round(math.log2(decay_rate(mode, wd, lr, lr)), 6)
            points[family][lr][log2_d].append(_mean_score(group, metric))
    out = []
    for family, by_lr in sorted(points.items()):
        if modes[family] != {"coupled", "independent"}:
            continue
        lrs = sorted(by_lr)
        best, fitted = {}, {}
        # λ = 0 is not a point in log2 d; where it beats every decayed cell, d* is below the grid: reported.
        zero = {
            lr: _mean_score(group, metric)
            for (g, o, p, w, m, wd, lr), group in _lr_wd_cells(rows).items()
            if (g, o, p, w) == family and wd == 0
        }
        for lr in lrs:
            curve = sorted((x, sum(v) / len(v)) for x, v in by_lr[lr].items())
            at = min(range(len(curve)), key=lambda i: (curve[i][1], curve[i][0]))
            best[lr], fitted[lr] = curve[at][0], _vertex(curve, at)
        xs = [math.log2(lr) for lr in lrs]
        out.append(
            {
                "grid": family[0],
                "optimizer": family[1],
                "parametrization": family[2],
                "width": family[3],
                "best_log2_d_per_log2_lr": {f"{math.log2(lr):g}": best[lr] for lr in lrs},
                "fitted_log2_d_per_log2_lr": {f"{math.log2(lr):g}": round(fitted[lr], 3) for lr in lrs},
                "slope_best_log2_d_vs_log2_lr": round(_slope(xs, [best[lr] for lr in lrs]), 3),
                "slope_fitted_log2_d_vs_log2_lr": round(_slope(xs, [fitted[lr] for lr in lrs]), 3),
                "no_decay_best_at_log2_lrs": [
                    math.log2(lr)
                    for lr in lrs
                    if zero.get(lr, math.inf) < min(sum(v) / len(v) for v in by_lr[lr].values())
                ],
            }
        )
    return out


def summarize_width_and_lr_wd(rows: list[dict[str, Any]], metric: str = "val_loss") -> dict[str, Any]:
    """Best lr per width (and its shift, in grid steps, narrowest → widest) and best wd per lr per heat-map.

    For a heat-map, "moves" are signed λ-grid steps from the smallest to the largest lr of a range (negative: the
    best λ falls as the lr grows, the diagonal of lr-coupled decay); "range" is max − min of the best λ's grid
    index.
    ``best_per_step_decay_per_log2_lr`` is the fraction of each decayed weight removed per step at the peak lr
    (α·λ for ``coupled``, λ for ``independent``): the quantity the equilibrium theory says sets the loss.
    """
    summary: dict[str, Any] = {"metric": metric, "width_transfer": [], "lr_wd": []}
    for (grid, opt, param, mode, wd), by_width in sorted(curves(rows, metric).items()):
        if len(by_width) < 2:
            continue
        lrs = sorted({lr for per in by_width.values() for lr in per})
        best = {w: _argmin(per) for w, per in sorted(by_width.items())}
        widths = sorted(best)
        summary["width_transfer"].append(
            {
                "grid": grid,
                "optimizer": opt,
                "parametrization": param,
                "weight_decay_mode": mode,
                "weight_decay": wd,
                "best_log2_lr": {str(w): math.log2(best[w]) for w in widths},
                "best_loss": {str(w): by_width[w][best[w]] for w in widths},
                "shift_grid_steps": lrs.index(best[widths[-1]]) - lrs.index(best[widths[0]]),
            }
        )
    for (grid, opt, param, width, mode), by_wd in sorted(heatmaps(rows, metric).items()):
        wds = sorted(by_wd)
        lrs = sorted({lr for per in by_wd.values() for lr in per})
        table = {lr: {wd: by_wd[wd].get(lr, math.inf) for wd in wds} for lr in lrs}
        best_wd = {lr: _argmin(table[lr]) for lr in lrs}
        best_loss = {lr: table[lr][best_wd[lr]] for lr in lrs}
        # "Near the optimum": learning rates within one grid step of the best (lr, wd) cell.
        opt_index = lrs.index(_argmin(best_loss))
        near = lrs[max(0, opt_index - 1) : opt_index + 2]
        index = {lr: wds.index(best_wd[lr]) for lr in lrs}
        near_idx = [index[lr] for lr in near]
        summary["lr_wd"].append(
            {
                "grid": grid,
                "optimizer": opt,
                "parametrization": param,
                "width": width,
                "weight_decay_mode": mode,
                "weight_decays": wds,
                "best_weight_decay_per_log2_lr": {f"{math.log2(lr):g}": best_wd[lr] for lr in lrs},
                "best_wd_grid_index_per_log2_lr": {f"{math.log2(lr):g}": index[lr] for lr in lrs},
                "best_loss_per_log2_lr": {f"{math.log2(lr):g}": best_loss[lr] for lr in lrs},
                "best_per_step_decay_per_log2_lr": {
                    f"{math.log2(lr):g}": decay_rate(mode, best_wd[lr], lr, lr) for lr in lrs
                },
                "best_weight_decay_per_seed": _best_wd_per_seed(rows, (grid, opt, param, width, mode), metric),
                "best_log2_lr": math.log2(lrs[opt_index]),
                "near_optimum_log2_lrs": [math.log2(lr) for lr in near],
                "best_wd_range_grid_steps_near_optimum": max(near_idx) - min(near_idx),
                "best_wd_move_grid_steps_near_optimum": near_idx[-1] - near_idx[0],
                "best_wd_range_grid_steps_all_lrs": max(index.values()) - min(index.values()),
                "best_wd_move_grid_steps_all_lrs": index[lrs[-1]] - index[lrs[0]],
            }
        )
    summary["lr_wd_per_step_decay"] = per_step_decay(rows, metric)
    return summary
