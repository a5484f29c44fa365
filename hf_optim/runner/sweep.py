"""``hf-optim sweep CONFIG``: width × learning-rate (× weight-decay) grids, SP vs muP, coupled vs independent decay.

Runs, on a CPU in minutes, the two experiments behind muP and decoupled weight decay:

- *width transfer* (Yang et al. 2022, Tensor Programs V, Fig. 1): under the standard parametrization the
  loss-minimising learning rate moves as the model widens; under muP it stays put;
- *LR × WD* (Loshchilov & Hutter 2019, Fig. 2; MosaicML Composer): whether the best weight decay moves with the
  learning rate under PyTorch's lr-coupled AdamW decay and under lr-independent decay. Which of the two stays put
  depends on which weights are decayed (docs/experiments/README.md): decaying the embedding and readout of a short,
  overfitting run keeps the coupled λ put; decaying only scale-invariant hidden matrices (``model.arch: olmo2``,
  ``train.decay: hidden``) is the regime of the published picture;
- *depth transfer* (Dey et al. 2025, CompleteP, Fig. 1): a grid with a ``depth`` axis at a fixed width compares
  width-only muP with depth-µP and CompleteP (``parametrization: depth_mup / completep``, ``model.base_depth``).

Each cell trains a small ``LlamaForCausalLM`` (or ``Olmo2ForCausalLM``) built from a config (no download) on the
bundled character-level tiny Shakespeare with a registered optimizer (default
:class:`hf_optim.optim.adam.optimizers.AdamW`) and, for muP, the overrides of :mod:`mup_integration.groups` for that
optimizer's muP family.

Outputs in ``--out``: ``results.jsonl`` (append-only log; re-running skips every cell whose key is in it),
``results.csv``, ``results.json``, ``summary.json`` (best lr per width and its shift, best λ per lr) and PNG plots.
Cells run in ``--jobs`` processes (one torch thread each), on CUDA when present unless ``--device cpu``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

from ._sweep_config import Cell, load_config
from ._sweep_results import ResultStore, row_for
from ._sweep_summary import summarize
from .bundled import recipes_dir


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def _run(cell: Cell, device: str) -> dict[str, Any]:
    from ._sweep_cell import run_cell

    return run_cell(cell, device)


def _pick_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but torch.cuda.is_available() is False; use cpu or auto.")
    return requested


def _cost(cell: Cell) -> float:
    """Relative cost of a cell for the ETA: training FLOPs grow like width² × steps (plus a fixed overhead)."""
    return (cell.width**2 * cell.model.layers + 64**2) * cell.train.steps


def _fmt_seconds(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}:{secs:02d}"


def run_sweep(
    config_path: str, out_dir: Path, *, jobs: int = 1, device: str = "auto", plots: bool = True, log=print
) -> dict[str, Any]:
    """Run (or resume) a sweep; return the summary. See the module docstring for the outputs."""
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be an integer >= 1, got {jobs!r}.")
    config = load_config(config_path)
    device = _pick_device(device)
    store = ResultStore(out_dir)
    todo = [c for c in config.cells if not store.done(c.key)]
    total = len(config.cells)
    log(
        f"sweep {config.name!r}: {total} cells, {total - len(todo)} already done, {len(todo)} to run "
        f"on {device} with {jobs} job(s) -> {out_dir}"
    )
    start, finished, done_cost = time.perf_counter(), 0, 0.0
    todo_cost = sum(_cost(c) for c in todo)

    def record(cell: Cell, result: dict[str, Any]) -> None:
        nonlocal finished, done_cost
        store.add(row_for(cell, result))
        finished += 1
        done_cost += _cost(cell)
        elapsed = time.perf_counter() - start
        eta = elapsed / done_cost * (todo_cost - done_cost)
        status = "DIVERGED" if result["diverged"] else f"train {result['train_loss']:.3f} val {result['val_loss']:.3f}"
        log(
            f"[{total - len(todo) + finished}/{total}] {cell.describe()}: {status} "
            f"({result['seconds']:.1f}s) elapsed {_fmt_seconds(elapsed)} ETA {_fmt_seconds(eta)}",
            flush=True,
        )

    # Seed by seed (an interrupted sweep leaves whole replicas), wide or deep (expensive) cells first within a seed so
    # parallel workers finish together instead of waiting on one straggler.
    todo.sort(key=lambda c: (c.seed, -_cost(c)))
    if jobs == 1:
        for cell in todo:
            record(cell, _run(cell, device))
    else:
        import multiprocessing

        context = multiprocessing.get_context("spawn")  # CUDA-safe; workers import torch once and are reused
        with ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker) as pool:
            pending = {pool.submit(_run, cell, device): cell for cell in todo}
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    record(pending.pop(future), future.result())
    rows = store.write_tables([c.key for c in config.cells])
    summary = summarize(rows)
    summary["config"] = config.name
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    if plots:
        from ._sweep_depth import plot_depth_transfer
        from ._sweep_multipliers import plot_multiplier_transfer
        from ._sweep_plots import plot_lr_wd, plot_width_transfer

        written = plot_width_transfer(rows, out_dir) + plot_lr_wd(rows, out_dir) + plot_depth_transfer(rows, out_dir)
        written += plot_multiplier_transfer(rows, out_dir)
        log("plots: " + ", ".join(p.name for p in written))
    for entry in summary["width_transfer"]:
        log(
            f"{entry['grid']} {entry['optimizer']} {entry['parametrization']:>3} ({entry['weight_decay_mode']}, "
            f"wd={entry['weight_decay']:g}): best log2 lr per width {entry['best_log2_lr']} "
            f"-> shift {entry['shift_grid_steps']} grid steps"
        )
    for entry in summary["depth_transfer"]:
        log(
            f"{entry['grid']} {entry['optimizer']} {entry['parametrization']:>9} width {entry['width']}: best log2 lr "
            f"per depth {entry['best_log2_lr']} -> shift {entry['shift_grid_steps']} grid steps; loss at the "
            f"shallowest depth's best lr { ({d: round(x, 3) for d, x in entry['loss_at_transferred_lr'].items()}) }"
        )
    for entry in summary["multiplier_tuning"]:
        log(
            f"{entry['grid']} {entry['optimizer']} {entry['parametrization']} w={entry['width']}: best of "
            f"{entry['combinations']} multiplier combinations {entry['best']} (default multipliers: "
            f"{entry.get('default')}); loss spread around the best {entry['spread_around_best']}"
        )
    for entry in summary["multiplier_transfer"]:
        sp = entry.get("sp_tuned_at_largest_width")
        log(
            f"{entry['transfer_grid']}: width {entry['largest_width']} at everything tuned at the base width "
            f"{entry['loss_at_transferred_lr'][str(entry['largest_width'])]:.3f}"
            + (f" vs SP tuned at that width {sp['loss']:.3f} (log2 lr {sp['log2_lr']:g})" if sp else "")
        )
    for entry in summary["lr_wd"]:
        log(
            f"{entry['grid']} {entry['optimizer']} {entry['parametrization']} w={entry['width']} "
            f"{entry['weight_decay_mode']}: best wd per log2 lr {entry['best_weight_decay_per_log2_lr']}; "
            f"range near optimum {entry['best_wd_range_grid_steps_near_optimum']} grid steps, "
            f"move over all lrs {entry['best_wd_move_grid_steps_all_lrs']:+d}"
        )
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-optim sweep", description=__doc__.split("\n\n")[0])
    bundled = sorted(p.stem for p in (recipes_dir() / "sweeps").glob("*.yaml"))
    parser.add_argument("config", help=f"sweep YAML, or a bundled name: {', '.join(bundled)}")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: sweep_out/<config name>)")
    parser.add_argument("--jobs", type=int, default=1, help="parallel worker processes (default 1)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    args = parser.parse_args(argv)
    out = args.out or Path("sweep_out") / Path(args.config).stem
    try:
        run_sweep(
            args.config,
            out,
            jobs=args.jobs,
            device=args.device,
            plots=not args.no_plots,
            log=lambda *a, **k: print(*a, **k),
        )
    except ValueError as error:
        print(f"hf-optim sweep: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
