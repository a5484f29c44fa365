"""Sweep plots (matplotlib, Agg backend): loss against log2(lr) per width, SP and muP side by side; LR × WD heat-maps.

Diverged cells (NaN/inf) are drawn clipped at the top of the axis with an ``x`` marker, not dropped, so a curve that
blows up at large lr is visibly different from one that was never run.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ._sweep_results import curves, heatmaps


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _slug(label: str) -> str:
    """A file-name-safe optimizer label: ``sgdw_v2(momentum=0.9)`` -> ``sgdw_v2-momentum0.9``."""
    return "".join(ch if ch.isalnum() or ch in "._" else "-" for ch in label.replace("=", "")).strip("-")


def _label(value: float) -> str:
    return "0" if value == 0 else f"{value:.3g}"


def plot_width_transfer(rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """One PNG per (grid, optimizer, decay mode, λ) with >= 2 widths: rows = train/val loss, columns = SP, muP."""
    plt = _plt()
    by_metric = {m: curves(rows, m) for m in ("train_loss", "val_loss")}
    families: dict[tuple, list[str]] = {}
    for grid, opt, param, mode, wd in by_metric["val_loss"]:
        if len(by_metric["val_loss"][(grid, opt, param, mode, wd)]) >= 2:
            families.setdefault((grid, opt, mode, wd), []).append(param)
    written = []
    for (grid, opt, mode, wd), params in sorted(families.items()):
        params = sorted(params, key=lambda p: ("sp", "mup").index(p))
        fig, axes = plt.subplots(2, len(params), figsize=(5.2 * len(params), 7.5), squeeze=False)
        for row_index, metric in enumerate(("train_loss", "val_loss")):
            finite = [v for p in params for per in by_metric[metric][(grid, opt, p, mode, wd)].values()
                      for v in per.values() if math.isfinite(v)]
            low, high = (min(finite), max(finite)) if finite else (0.0, 1.0)
            ceiling = high + 0.08 * (high - low + 1e-9)
            for col, param in enumerate(params):
                ax = axes[row_index][col]
                by_width = by_metric[metric][(grid, opt, param, mode, wd)]
                cmap = plt.get_cmap("viridis")
                for i, width in enumerate(sorted(by_width)):
                    color = cmap(i / max(1, len(by_width) - 1))
                    lrs = sorted(by_width[width])
                    xs = [math.log2(lr) for lr in lrs]
                    ys = [by_width[width][lr] for lr in lrs]
                    ax.plot(xs, [y if math.isfinite(y) else ceiling for y in ys], "-o", color=color, ms=3,
                            label=f"width {width}")
                    bad = [(x, ceiling) for x, y in zip(xs, ys) if not math.isfinite(y)]
                    if bad:
                        ax.plot(*zip(*bad), "x", color=color, ms=8)
                    best = min(range(len(ys)), key=lambda j: ys[j])
                    if math.isfinite(ys[best]):
                        ax.plot(xs[best], ys[best], "*", color=color, ms=14, mec="k")
                ax.set_ylim(low - 0.03 * (high - low + 1e-9), ceiling + 0.03 * (high - low + 1e-9))
                ax.set_title(f"{param.upper()}: final {metric.replace('_', ' ')}")
                ax.set_xlabel("log2(learning rate)")
                ax.set_ylabel("loss (x = diverged, clipped)")
                ax.grid(alpha=0.3)
                ax.legend(fontsize=8)
        fig.suptitle(f"{grid}: {opt} ({mode}, wd={_label(wd)}); star = best lr per width")
        fig.tight_layout()
        path = out_dir / f"{grid}_{_slug(opt)}_{mode}_wd{_label(wd)}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def plot_lr_wd(rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """One PNG per (grid, optimizer, parametrization, width): a val-loss heat-map per decay mode, best λ per lr
    marked."""
    plt = _plt()
    maps = heatmaps(rows, "val_loss")
    families: dict[tuple, list[str]] = {}
    for grid, opt, param, width, mode in maps:
        families.setdefault((grid, opt, param, width), []).append(mode)
    written = []
    for (grid, opt, param, width), modes in sorted(families.items()):
        fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.8), squeeze=False)
        for ax, mode in zip(axes[0], sorted(modes)):
            by_wd = maps[(grid, opt, param, width, mode)]
            wds = sorted(by_wd)
            lrs = sorted({lr for per in by_wd.values() for lr in per})
            grid_values = [[by_wd[wd].get(lr, math.inf) for lr in lrs] for wd in wds]
            finite = sorted(v for line in grid_values for v in line if math.isfinite(v))
            # Colour range: best cell to the 60th percentile, so the valley is readable; worse/diverged saturate.
            vmin, vmax = (finite[0], finite[int(0.6 * (len(finite) - 1))]) if finite else (0.0, 1.0)
            clipped = [[min(v, vmax) if math.isfinite(v) else vmax for v in line] for line in grid_values]
            image = ax.imshow(clipped, origin="lower", aspect="auto", cmap="viridis_r", vmin=vmin, vmax=vmax)
            fig.colorbar(image, ax=ax, label="final val loss (clipped)")
            for j, lr in enumerate(lrs):
                column = [grid_values[i][j] for i in range(len(wds))]
                best = min(range(len(wds)), key=lambda i: column[i])
                if math.isfinite(column[best]):
                    ax.plot(j, best, "o", mfc="none", mec="red", ms=12, mew=2)
                for i, value in enumerate(column):
                    ax.text(j, i, "div" if not math.isfinite(value) else f"{value:.2f}", ha="center",
                            va="center", fontsize=6, color="w")
            ax.set_xticks(range(len(lrs)), [f"{math.log2(lr):g}" for lr in lrs])
            ax.set_yticks(range(len(wds)), [_label(wd) for wd in wds])
            ax.set_xlabel("log2(learning rate)")
            ax.set_ylabel("weight decay λ")
            ax.set_title(f"{mode} decay (red circle = best λ per lr)")
        fig.suptitle(f"{grid}: {opt}, {param.upper()} width {width}, LR × WD")
        fig.tight_layout()
        path = out_dir / f"{grid}_{_slug(opt)}_{param}_w{width}_lr_wd.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written
