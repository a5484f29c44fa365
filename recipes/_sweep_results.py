"""Sweep results: an append-only JSON-lines log (the resume point), CSV/JSON tables, and the optimum analysis.

Analysis conventions (used by the plots and the write-up): a cell's score is its final validation loss; seeds are
averaged (a diverged seed makes the mean ``inf``); the best learning rate of a curve is the arg-min over the lr grid;
"grid steps" are indices in the sorted lr (or weight-decay) grid.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ._sweep_config import DEFAULT_OPTIMIZER, Cell

COLUMNS = ["key", "grid", "optimizer", "optimizer_args", "parametrization", "width", "lr", "log2_lr",
           "weight_decay_mode", "weight_decay",
           "wd_rule", "seed", "train_loss", "val_loss", "diverged", "steps_done", "n_params", "seconds", "device"]


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
        self.rows[row["key"]] = row
        with self.log.open("a") as f:
            f.write(json.dumps(row, allow_nan=True) + "\n")

    def write_tables(self, keys: list[str] | None = None) -> list[dict[str, Any]]:
        """Write CSV and JSON for ``keys`` (default: every row), sorted for reading; returns the rows."""
        rows = [self.rows[k] for k in (keys if keys is not None else self.rows) if k in self.rows]
        rows.sort(key=lambda r: (r["grid"], optimizer_label(r), r["parametrization"], r["weight_decay_mode"],
                                 r["width"], r["weight_decay"], r["lr"], r["seed"]))
        with (self.out_dir / "results.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        # JSON cannot hold NaN portably: diverged losses become null.
        clean = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}
                 for r in rows]
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
        cells[(r["grid"], optimizer_label(r), r["parametrization"], r["weight_decay_mode"], r["weight_decay"],
               r["width"], r["lr"])].append(r)
    out: dict[tuple, dict[int, dict[float, float]]] = defaultdict(lambda: defaultdict(dict))
    for (grid, opt, param, mode, wd, width, lr), group in cells.items():
        out[(grid, opt, param, mode, wd)][width][lr] = _mean_score(group, metric)
    return out


def heatmaps(rows: list[dict[str, Any]], metric: str = "val_loss") -> dict[tuple, dict[float, dict[float, float]]]:
    """``{(grid, optimizer, parametrization, width, mode): {wd: {lr: seed-mean loss}}}`` (>= 2 weight decays)."""
    cells: dict[tuple, list] = defaultdict(list)
    for r in rows:
        cells[(r["grid"], optimizer_label(r), r["parametrization"], r["width"], r["weight_decay_mode"],
               r["weight_decay"], r["lr"])].append(r)
    out: dict[tuple, dict[float, dict[float, float]]] = defaultdict(lambda: defaultdict(dict))
    for (grid, opt, param, width, mode, wd, lr), group in cells.items():
        out[(grid, opt, param, width, mode)][wd][lr] = _mean_score(group, metric)
    return {k: v for k, v in out.items() if len(v) >= 2}


def _argmin(values: dict[float, float]) -> float:
    return min(values, key=lambda x: (values[x], x))


def summarize(rows: list[dict[str, Any]], metric: str = "val_loss") -> dict[str, Any]:
    """Best lr per width (and its shift, in grid steps, narrowest → widest) and best wd per lr per heat-map."""
    summary: dict[str, Any] = {"metric": metric, "width_transfer": [], "lr_wd": []}
    for (grid, opt, param, mode, wd), by_width in sorted(curves(rows, metric).items()):
        if len(by_width) < 2:
            continue
        lrs = sorted({lr for per in by_width.values() for lr in per})
        best = {w: _argmin(per) for w, per in sorted(by_width.items())}
        widths = sorted(best)
        summary["width_transfer"].append({
            "grid": grid, "optimizer": opt, "parametrization": param, "weight_decay_mode": mode,
            "weight_decay": wd, "best_log2_lr": {str(w): math.log2(best[w]) for w in widths},
            "best_loss": {str(w): by_width[w][best[w]] for w in widths},
            "shift_grid_steps": lrs.index(best[widths[-1]]) - lrs.index(best[widths[0]]),
        })
    for (grid, opt, param, width, mode), by_wd in sorted(heatmaps(rows, metric).items()):
        wds = sorted(by_wd)
        lrs = sorted({lr for per in by_wd.values() for lr in per})
        table = {lr: {wd: by_wd[wd].get(lr, math.inf) for wd in wds} for lr in lrs}
        best_wd = {lr: _argmin(table[lr]) for lr in lrs}
        best_loss = {lr: table[lr][best_wd[lr]] for lr in lrs}
        # "Near the optimum": learning rates within one grid step of the best (lr, wd) cell.
        opt_index = lrs.index(_argmin(best_loss))
        near = lrs[max(0, opt_index - 1): opt_index + 2]
        near_idx = [wds.index(best_wd[lr]) for lr in near]
        summary["lr_wd"].append({
            "grid": grid, "optimizer": opt, "parametrization": param, "width": width, "weight_decay_mode": mode,
            "best_weight_decay_per_log2_lr": {f"{math.log2(lr):g}": best_wd[lr] for lr in lrs},
            "best_log2_lr": math.log2(lrs[opt_index]),
            "near_optimum_log2_lrs": [math.log2(lr) for lr in near],
            "best_wd_range_grid_steps_near_optimum": max(near_idx) - min(near_idx),
            "best_wd_range_grid_steps_all_lrs": max(wds.index(best_wd[lr]) for lr in lrs)
            - min(wds.index(best_wd[lr]) for lr in lrs),
        })
    return summary
