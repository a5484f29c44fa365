"""What ``hf-optim train`` leaves behind (rank 0 only): ``metrics.json``, ``metrics.csv``, ``loss.png`` and the
closing summary on the terminal."""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def step_zero_loss(history: list[dict[str, Any]]) -> float | None:
    """The validation loss at step 0, as :class:`~hf_optim.runner._trainer.StepZeroEval` stored it in the history."""
    return next((r["eval_loss"] for r in history if r.get("step") == 0 and "eval_loss" in r), None)


def write_outputs(out: Path, history: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    (out / "metrics.json").write_text(json.dumps({"summary": summary, "log_history": history}, indent=2))
    keys = ["step", "epoch", "loss", "eval_loss", "learning_rate", "grad_norm"]
    with (out / "metrics.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        for row in history:
            if "loss" in row or "eval_loss" in row:
                writer.writerow(row)
    plot_losses(out / "loss.png", history, summary["recipe"])


def plot_losses(path: Path, history: list[dict[str, Any]], title: str) -> None:
    """Training and validation loss against the optimizer step, from the whole history (a resumed run included)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    val = [(r["step"], r["eval_loss"]) for r in history if "eval_loss" in r]
    if train:
        ax.plot(*zip(*train), label="train")
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set(xlabel="optimizer step", ylabel="loss (nats/token)", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _seconds(value: float) -> str:
    return f"{value:.0f} s" if value >= 10 else f"{value:.1f} s"


def summary_lines(summary: Mapping[str, Any], out: Path) -> list[str]:
    """A few lines a user can act on: the loss drop, where everything went, how to continue."""
    out = out.resolve()
    final, initial, last_step = summary["final_eval_loss"], summary["initial_eval_loss"], summary["global_step"]
    if initial is None:
        change = f"{final:.3f} at step {last_step}"
    else:
        change = f"{initial:.3f} at step 0 -> {final:.3f} at step {last_step} ({final - initial:+.3f})"
    checkpoints = sorted((p.name for p in out.glob("checkpoint-*")), key=lambda n: int(n.rpartition("-")[2]))
    resumed = summary.get("resumed_from_step")
    span = f" (steps {resumed + 1}-{last_step}, resumed from checkpoint-{resumed})" if resumed else ""
    return [
        (
            f"done: {summary['steps']} steps{span} in {_seconds(summary['seconds'])} of training "
            f"({_seconds(summary['total_seconds'])} in all, {summary['world_size']} "
            f"process{'es' if summary['world_size'] > 1 else ''})"
        ),
        f"validation loss: {change}; a uniform guess scores {summary['uniform_loss']:.3f} (nats/token)",
        f"outputs:    {out}",
        f"loss curve: {out / 'loss.png'}",
        f"metrics:    {out / 'metrics.json'} (and metrics.csv)",
        (
            f"checkpoints: {', '.join(checkpoints) or 'none'} (to continue: the same command with --resume and a "
            "larger run.max_steps)"
        ),
    ]


def print_summary(summary: Mapping[str, Any], out: Path) -> None:
    print("\n".join(f"[hf-optim] {line}" for line in summary_lines(summary, out)), flush=True)
