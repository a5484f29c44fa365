"""The whole summary of a sweep: width transfer and LR x WD (:mod:`._sweep_results`), depth transfer
(:mod:`._sweep_depth`) and multiplier tuning and transfer (:mod:`._sweep_multipliers`), assembled here so that the
analyses do not import each other's summaries."""

from __future__ import annotations

from typing import Any

from ._sweep_depth import depth_transfer
from ._sweep_multipliers import transfer, tuning
from ._sweep_results import summarize_width_and_lr_wd


def summarize(rows: list[dict[str, Any]], metric: str = "val_loss") -> dict[str, Any]:
    """Every summary the committed experiments are checked against (``summary.json``)."""
    summary = summarize_width_and_lr_wd(rows, metric)
    summary["depth_transfer"] = depth_transfer(rows, metric)
    summary["multiplier_tuning"] = tuning(rows, metric)
    summary["multiplier_transfer"] = transfer(rows, metric)
    return summary
