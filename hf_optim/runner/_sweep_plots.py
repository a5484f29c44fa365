"""Sweep plots (matplotlib, Agg backend): loss against log2(lr) per width, SP and muP side by side; LR × WD heat-maps.

Diverged cells (NaN/inf) are drawn clipped at the top of the axis with an ``x`` marker, not dropped, so a curve that
blows up at large lr is visibly different from one that was never run.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from hf_optim.decay import decay_rate

from ._sweep_results import curves, heatmaps, per_step_decay


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path, *, dpi: int) -> Path:
    """Lay out, write and close ``fig``; the path written."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


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
            finite = [
                v
                for p in params
                for per in by_metric[metric][(grid, opt, p, mode, wd)].values()
                for v in per.values()
                if math.isfinite(v)
            ]
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
                    ax.plot(
                        xs,
                        [y if math.isfinite(y) else ceiling for y in ys],
                        "-o",
                        color=color,
                        ms=3,
                        label=f"width {width}",
                    )
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
        written.append(_save(plt, fig, out_dir / f"{grid}_{_slug(opt)}_{mode}_wd{_label(wd)}.png", dpi=90))
    return written


def _plot_best_decay(
    ax,
    maps: dict[tuple, dict[float, dict[float, float]]],
    family: tuple,
    modes: list[str],
    pooled: dict[str, Any] | None = None,
) -> None:
    """The best per-step decay d* (fraction of each decayed weight removed per step at the peak lr: α·λ coupled, λ
    independent) against the lr, one line per mode: the coordinate in which both modes are one update rule, and in
    which the rotational-equilibrium picture predicts a flat line (coupled λ* ∝ 1/α) and the |w| ≈ 1/λ picture a
    slope of 1 (coupled λ* flat). A λ = 0 optimum is drawn as a triangle on the bottom edge. ``pooled``: the
    :func:`~recipes._sweep_results.per_step_decay` entry (both modes' cells on one log2 d axis, parabola vertex per
    lr), drawn in black with a slope-1 guide through its mean."""
    markers = {"coupled": "o-", "independent": "s--"}
    lows, lines = [], {}
    for mode in modes:
        by_wd = maps[(*family, mode)]
        lrs = sorted({lr for per in by_wd.values() for lr in per})
        best = {lr: min(by_wd, key=lambda wd: (by_wd[wd].get(lr, math.inf), wd)) for lr in lrs}
        lines[mode] = [(math.log2(lr), decay_rate(mode, best[lr], lr, lr)) for lr in lrs]
        lows += [math.log2(decay_rate(mode, wd, lr, lr)) for wd in by_wd if wd > 0 for lr in lrs]
    floor = (min(lows) - 1) if lows else -20.0
    for mode, points in lines.items():
        xs = [x for x, _ in points]
        ys = [math.log2(d) if d > 0 else floor for _, d in points]
        ax.plot(xs, ys, markers.get(mode, "^-"), label=mode, ms=7, mfc="none" if mode == "independent" else None)
        zero = [(x, floor) for (x, d) in points if d == 0]
        if zero:
            ax.plot(*zip(*zero), "v", color="k", ms=9)
    if pooled is not None:
        fitted = {float(k): v for k, v in pooled["fitted_log2_d_per_log2_lr"].items()}
        xs = sorted(fitted)
        ax.plot(
            xs,
            [fitted[x] for x in xs],
            "kD-",
            ms=5,
            lw=2,
            label=f"both modes pooled, fit (slope {pooled['slope_fitted_log2_d_vs_log2_lr']:.2f})",
        )
        mx, my = sum(xs) / len(xs), sum(fitted.values()) / len(xs)
        ax.plot(xs, [my + x - mx for x in xs], ":", color="grey", label="slope 1 (coupled λ* lr-free)")
    ax.set_xlabel("log2(learning rate)")
    ax.set_ylabel("log2(best per-step decay d*)  (▼ = λ = 0 best)")
    ax.set_title("best per-step decay: flat = lr-free d*")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_lr_wd(rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """One PNG per (grid, optimizer, parametrization, width): a val-loss heat-map per decay mode, best λ per lr
    marked, and (with both decoupled modes) the best per-step decay against the lr."""
    plt = _plt()
    maps = heatmaps(rows, "val_loss")
    pooled = {(e["grid"], e["optimizer"], e["parametrization"], e["width"]): e for e in per_step_decay(rows)}
    families: dict[tuple, list[str]] = {}
    for grid, opt, param, width, mode in maps:
        families.setdefault((grid, opt, param, width), []).append(mode)
    written = []
    for (grid, opt, param, width), modes in sorted(families.items()):
        decoupled = sorted(m for m in modes if m in ("coupled", "independent"))
        panels = len(modes) + (len(decoupled) == 2)
        fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.8), squeeze=False)
        if len(decoupled) == 2:
            _plot_best_decay(
                axes[0][-1], maps, (grid, opt, param, width), decoupled, pooled.get((grid, opt, param, width))
            )
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
            for j, _lr in enumerate(lrs):
                column = [grid_values[i][j] for i in range(len(wds))]
                best = min(range(len(wds)), key=lambda i: column[i])
                if math.isfinite(column[best]):
                    ax.plot(j, best, "o", mfc="none", mec="red", ms=12, mew=2)
                for i, value in enumerate(column):
                    ax.text(
                        j,
                        i,
                        "div" if not math.isfinite(value) else f"{value:.2f}",
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="w",
                    )
            ax.set_xticks(range(len(lrs)), [f"{math.log2(lr):g}" for lr in lrs])
            ax.set_yticks(range(len(wds)), [_label(wd) for wd in wds])
            ax.set_xlabel("log2(learning rate)")
            ax.set_ylabel("weight decay λ")
            ax.set_title(f"{mode} decay (red circle = best λ per lr)")
        fig.suptitle(f"{grid}: {opt}, {param.upper()} width {width}, LR × WD")
        written.append(_save(plt, fig, out_dir / f"{grid}_{_slug(opt)}_{param}_w{width}_lr_wd.png", dpi=90))
    return written
