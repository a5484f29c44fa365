"""Tuning muP's base multipliers at the base width and transferring them (Tensor Programs V, Fig. 4 and §7).

Conventions as in :mod:`._sweep_results`: a cell's score is its final validation loss averaged over seeds (a
diverged seed makes the mean ``inf``); arg-mins break ties towards the smaller value.

* A *tuning* family is every row of one (grid, optimizer, parametrization, decay mode, λ, width, depth) with >= 2
  combinations of the multipliers (``output_mult``, ``attn_mult``, ``init_std``; :mod:`._sweep_axes`). Its optimum
  is the arg-min over (multipliers, lr) jointly; ``around_best`` varies one multiplier at a time with the others at
  their best values (best over lr), which is the "which multipliers matter" view of TP V's Fig. 4.
* A *transfer* grid is a grid of the same optimizer, parametrization and decay whose rows all use the tuned
  multipliers and cover >= 2 widths. At its largest width it is scored at the tuned learning rate (everything taken
  from the base model, nothing re-tuned) against SP tuned at that width (SP's best lr there, any grid), and against
  muP with the default multipliers at *its* base-tuned lr.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from ._sweep_axes import MULTIPLIER_AXES
from ._sweep_config import ModelSettings
from ._sweep_depth import layers_of
from ._sweep_results import _argmin, _mean_score, optimizer_label

#: The multipliers of a row logged before they were recorded: the ModelSettings defaults.
DEFAULTS = tuple(getattr(ModelSettings(), name) for name in MULTIPLIER_AXES)


def multipliers_of(row: dict[str, Any]) -> tuple[float, ...]:
    """``(output_mult, attn_mult, init_std)`` of a row (defaults for rows without them)."""
    model = row.get("settings", {}).get("model", {})
    return tuple(float(model.get(name, default)) for name, default in zip(MULTIPLIER_AXES, DEFAULTS))


def _family(row: dict[str, Any]) -> tuple:
    return optimizer_label(row), row["parametrization"], row["weight_decay_mode"], row["weight_decay"]


def _scores(rows: list[dict[str, Any]], metric: str) -> dict[tuple, float]:
    """``{(grid, family, width, layers, multipliers, lr): seed-mean score}``."""
    cells: dict[tuple, list] = defaultdict(list)
    for r in rows:
        cells[(r["grid"], _family(r), r["width"], layers_of(r), multipliers_of(r), r["lr"])].append(r)
    return {key: _mean_score(group, metric) for key, group in cells.items()}


def _named(mults: tuple[float, ...]) -> dict[str, float]:
    return dict(zip(MULTIPLIER_AXES, mults))


def tuning(rows: list[dict[str, Any]], metric: str = "val_loss") -> list[dict[str, Any]]:
    """One entry per tuning family: the joint optimum, the default multipliers' best, and one-at-a-time curves."""
    tables: dict[tuple, dict[tuple, float]] = defaultdict(dict)
    for (grid, fam, width, layers, mults, lr), score in _scores(rows, metric).items():
        tables[(grid, fam, width, layers)][(mults, lr)] = score
    out = []
    for (grid, fam, width, layers), table in sorted(tables.items(), key=lambda kv: str(kv[0])):
        combos = sorted({m for m, _ in table})
        if len(combos) < 2:
            continue
        best_over_lr = {m: min(s for (m2, _), s in table.items() if m2 == m) for m in combos}
        best_mults, best_lr = min(table, key=lambda k: (table[k], k))
        around: dict[str, dict[str, float]] = {}
        for i, name in enumerate(MULTIPLIER_AXES):
            line = {m[i]: best_over_lr[m] for m in combos if m[:i] + m[i + 1 :] == best_mults[:i] + best_mults[i + 1 :]}
            if len(line) >= 2:
                around[name] = {f"{value:g}": line[value] for value in sorted(line)}
        default_lrs = {lr: s for (m, lr), s in table.items() if m == DEFAULTS}
        entry = {
            "grid": grid,
            "optimizer": fam[0],
            "parametrization": fam[1],
            "weight_decay_mode": fam[2],
            "weight_decay": fam[3],
            "width": width,
            "layers": layers,
            "combinations": len(combos),
            "best": {**_named(best_mults), "log2_lr": math.log2(best_lr), "loss": table[(best_mults, best_lr)]},
            "around_best": around,
            "spread_around_best": {
                name: max(v for v in line.values() if math.isfinite(v)) - min(line.values())
                for name, line in around.items()
            },
        }
        if default_lrs:
            lr = _argmin(default_lrs)
            entry["default"] = {**_named(DEFAULTS), "log2_lr": math.log2(lr), "loss": default_lrs[lr]}
        out.append(entry)
    return out


def _per_width(
    scores: dict[tuple, float], fam: tuple, mults: tuple[float, ...], grids: set[str] | None = None
) -> dict[int, dict[float, float]]:
    """``{width: {lr: score}}`` of one family at ``mults`` (in ``grids`` when given; the best over grids otherwise)."""
    out: dict[int, dict[float, float]] = defaultdict(dict)
    for (grid, f, width, _, m, lr), score in scores.items():
        if f == fam and m == mults and (grids is None or grid in grids):
            out[width][lr] = min(score, out[width].get(lr, math.inf))
    return dict(sorted(out.items()))


def _transfer_grids(scores: dict[tuple, float], fam: tuple, mults: tuple[float, ...], tuning_grid: str) -> list[str]:
    """The grids of ``fam`` whose every row uses ``mults`` and that cover >= 2 widths (the tuning grid excluded)."""
    widths: dict[str, set[int]] = defaultdict(set)
    mixed = set()
    for (grid, f, width, _, m, _), _score in scores.items():
        if f == fam:
            widths[grid].add(width)
            if m != mults:
                mixed.add(grid)
    return sorted(g for g, ws in widths.items() if g != tuning_grid and g not in mixed and len(ws) >= 2)


def transfer(rows: list[dict[str, Any]], metric: str = "val_loss") -> list[dict[str, Any]]:
    """One entry per (tuning family, transfer grid): the tuned muP at the largest width against SP tuned there."""
    scores = _scores(rows, metric)
    out = []
    for tuned in tuning(rows, metric):
        fam = (tuned["optimizer"], tuned["parametrization"], tuned["weight_decay_mode"], tuned["weight_decay"])
        mults = tuple(tuned["best"][name] for name in MULTIPLIER_AXES)
        lr_t = 2.0 ** tuned["best"]["log2_lr"]
        for grid in _transfer_grids(scores, fam, mults, tuned["grid"]):
            by_width = _per_width(scores, fam, mults, {grid})
            top = max(by_width)
            entry = {
                "tuning_grid": tuned["grid"],
                "transfer_grid": grid,
                "optimizer": fam[0],
                "parametrization": fam[1],
                "multipliers": _named(mults),
                "transferred_log2_lr": math.log2(lr_t),
                "largest_width": top,
                "loss_at_transferred_lr": {str(w): per.get(lr_t, math.inf) for w, per in by_width.items()},
                "best_log2_lr": {str(w): math.log2(_argmin(per)) for w, per in by_width.items()},
            }
            sp = _per_width(scores, (fam[0], "sp", *fam[2:]), DEFAULTS).get(top)
            if sp:
                sp_lr = _argmin(sp)
                entry["sp_tuned_at_largest_width"] = {"log2_lr": math.log2(sp_lr), "loss": sp[sp_lr]}
                entry["margin_vs_sp"] = sp[sp_lr] - by_width[top].get(lr_t, math.inf)
            default = _per_width(scores, fam, DEFAULTS).get(top, {})
            if "default" in tuned and 2.0 ** tuned["default"]["log2_lr"] in default:
                lr_d = 2.0 ** tuned["default"]["log2_lr"]
                entry["default_multipliers_at_their_transferred_lr"] = {
                    "log2_lr": math.log2(lr_d),
                    "loss": default[lr_d],
                }
            out.append(entry)
    return out


def plot_multiplier_transfer(rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Per transfer entry: left, the one-at-a-time curves at the base width (loss vs log2 of the multiplier over its
    default); right, loss vs width for SP tuned per width, muP with default multipliers and with the tuned ones,
    both at the lr tuned at the base width."""
    from ._sweep_plots import _plt, _save, _slug

    plt = _plt()
    scores = _scores(rows, "val_loss")
    tuned_by_grid = {t["grid"]: t for t in tuning(rows)}
    written = []
    for entry in transfer(rows):
        tuned = tuned_by_grid[entry["tuning_grid"]]
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
        for name, line in tuned["around_best"].items():
            default = DEFAULTS[MULTIPLIER_AXES.index(name)]
            xs = [math.log2(float(v) / default) for v in line]
            left.plot(xs, [y if math.isfinite(y) else math.nan for y in line.values()], "o-", label=name)
        left.set(xlabel="log2(multiplier / default)", ylabel="validation loss (best over lr)")
        left.set_title(f"width {tuned['width']}: one multiplier varied, others at best", fontsize=10)
        left.grid(alpha=0.3)
        left.legend(fontsize=8)
        fam_opt, mode, wd = entry["optimizer"], tuned["weight_decay_mode"], tuned["weight_decay"]
        others = {g for g, *_ in scores} - {entry["tuning_grid"]}

        def at(param: str, lr: float | None, fam_opt=fam_opt, mode=mode, wd=wd, others=others) -> dict[int, float]:
            """Per width: the score at ``lr`` (None: the best over lr), the tuning grid left out."""
            found = _per_width(scores, (fam_opt, param, mode, wd), DEFAULTS, others)
            return {w: (min(per.values()) if lr is None else per.get(lr, math.nan)) for w, per in found.items()}

        default_lr = 2.0 ** tuned["default"]["log2_lr"] if "default" in tuned else None
        lines = [
            ("SP, lr tuned at each width", at("sp", None), "s--"),
            (
                "muP, default multipliers, base-tuned lr",
                at(entry["parametrization"], default_lr) if default_lr else {},
                "o-",
            ),
            (
                "muP, base-tuned multipliers and lr",
                {int(w): v for w, v in entry["loss_at_transferred_lr"].items()},
                "*-",
            ),
        ]
        for label, by_width, style in lines:
            if by_width:
                ws = sorted(by_width)
                right.plot([math.log2(w) for w in ws], [by_width[w] for w in ws], style, label=label, ms=8)
        right.set(xlabel="log2(width)", ylabel="validation loss")
        right.set_title("transfer: everything tuned at the base width", fontsize=10)
        right.grid(alpha=0.3)
        right.legend(fontsize=8)
        written.append(_save(plt, fig, out_dir / f"{entry['transfer_grid']}_{_slug(fam_opt)}_multipliers.png", dpi=100))
    return written
