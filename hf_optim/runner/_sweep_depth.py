"""Depth-transfer analysis of sweep results: best learning rate per depth, its shift, and the transferred-lr loss.

A *family* is every row of one (grid, optimizer, parametrization, decay mode, λ, width) over >= 2 depths (``layers``).
Conventions as in :mod:`._sweep_results`: a cell's score is its final validation loss averaged over seeds (a
diverged seed makes the mean ``inf``), the best lr of a depth is the arg-min over the lr grid, "grid steps" are
indices in the sorted lr grid. The *transferred* lr is the best lr of the shallowest depth (the base model tuned):
``loss_at_transferred_lr`` is what each depth scores there, which is what depth transfer promises to keep good.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from ._sweep_results import _argmin, _mean_score, optimizer_label


def layers_of(row: dict[str, Any]) -> int | None:
    """The row's number of blocks (``settings.model.layers``; None for a row without settings, e.g. hand-built)."""
    layers = row.get("settings", {}).get("model", {}).get("layers")
    return None if layers is None else int(layers)


def depth_curves(rows: list[dict[str, Any]], metric: str = "val_loss") -> dict[tuple, dict[int, dict[float, float]]]:
    """``{(grid, optimizer, parametrization, mode, wd, width): {layers: {lr: seed-mean loss}}}``."""
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
                layers_of(r),
                r["lr"],
            )
        ].append(r)
    out: dict[tuple, dict[int, dict[float, float]]] = defaultdict(lambda: defaultdict(dict))
    for (grid, opt, param, mode, wd, width, layers, lr), group in cells.items():
        out[(grid, opt, param, mode, wd, width)][layers][lr] = _mean_score(group, metric)
    return out


def depth_transfer(rows: list[dict[str, Any]], metric: str = "val_loss") -> list[dict[str, Any]]:
    """One entry per family with >= 2 depths: best log2 lr and loss per depth, the shift of the best lr (grid steps,
    shallowest -> deepest), whether an optimum lies on the edge of the lr grid (not bracketed), and each depth's loss
    at the shallowest depth's best lr."""
    out = []
    for (grid, opt, param, mode, wd, width), by_depth in sorted(depth_curves(rows, metric).items()):
        if len(by_depth) < 2:
            continue
        depths = sorted(by_depth)
        lrs = sorted({lr for per in by_depth.values() for lr in per})
        best = {d: _argmin(by_depth[d]) for d in depths}
        transferred = best[depths[0]]
        out.append(
            {
                "grid": grid,
                "optimizer": opt,
                "parametrization": param,
                "weight_decay_mode": mode,
                "weight_decay": wd,
                "width": width,
                "best_log2_lr": {str(d): math.log2(best[d]) for d in depths},
                "best_loss": {str(d): by_depth[d][best[d]] for d in depths},
                "shift_grid_steps": lrs.index(best[depths[-1]]) - lrs.index(best[depths[0]]),
                "optimum_on_grid_edge": {str(d): best[d] in (lrs[0], lrs[-1]) for d in depths},
                "transferred_log2_lr": math.log2(transferred),
                "loss_at_transferred_lr": {str(d): by_depth[d].get(transferred, math.inf) for d in depths},
            }
        )
    return out


def plot_depth_transfer(rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """One PNG per (grid, optimizer, decay mode, λ, width) with >= 2 depths: val loss vs log2 lr, one panel per
    parametrization, one line per depth, a star at each depth's best lr."""
    from ._sweep_plots import _label, _plt, _save, _slug

    plt = _plt()
    curves = depth_curves(rows)
    families: dict[tuple, list[str]] = defaultdict(list)
    for (grid, opt, param, mode, wd, width), by_depth in curves.items():
        if len(by_depth) >= 2:
            families[(grid, opt, mode, wd, width)].append(param)
    order = ["sp", "mup", "depth_mup", "completep"]
    titles = {"sp": "SP", "mup": "width-only muP", "depth_mup": "depth-µP (α=0.5)", "completep": "CompleteP (α=1)"}
    written = []
    for (grid, opt, mode, wd, width), params in sorted(families.items()):
        params = sorted(params, key=lambda p: order.index(p) if p in order else len(order))
        fig, axes = plt.subplots(1, len(params), figsize=(max(5.6, 4.2 * len(params)), 3.6), sharey=True, squeeze=False)
        finite = [
            x
            for p in params
            for per in curves[(grid, opt, p, mode, wd, width)].values()
            for x in per.values()
            if math.isfinite(x)
        ]
        for ax, param in zip(axes[0], params):
            by_depth = curves[(grid, opt, param, mode, wd, width)]
            cmap = plt.get_cmap("viridis")
            for i, depth in enumerate(sorted(by_depth)):
                color = cmap(i / max(1, len(by_depth) - 1))
                lrs = sorted(by_depth[depth])
                xs = [math.log2(lr) for lr in lrs]
                ys = [by_depth[depth][lr] if math.isfinite(by_depth[depth][lr]) else math.nan for lr in lrs]
                ax.plot(xs, ys, marker="o", ms=3, color=color, label=f"depth {depth}")
                best = _argmin(by_depth[depth])
                if math.isfinite(by_depth[depth][best]):
                    ax.plot([math.log2(best)], [by_depth[depth][best]], marker="*", ms=12, color=color)
            ax.set_title(titles.get(param, param), fontsize=10)
            ax.set_xlabel("log2 learning rate")
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.grid(alpha=0.3)
        if finite:
            low = min(finite)
            axes[0][0].set_ylim(low - 0.05, min(max(finite), low + 1.0))
        axes[0][0].set_ylabel("validation loss (seed mean)")
        axes[0][-1].legend(fontsize=8)
        # one panel is too narrow for the whole title on one line
        sep = "\n" if len(params) == 1 else "; "
        fig.suptitle(
            f"{grid}: {opt} ({mode}, wd={_label(wd)}), width {width}{sep}star = best lr per depth", fontsize=10
        )
        written.append(_save(plt, fig, out_dir / f"{grid}_{_slug(opt)}_w{width}_depth.png", dpi=110))
    return written
