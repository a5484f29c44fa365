"""``hf-optim mutransfer RECIPE``: tune a small proxy of a muP recipe, write the target's recipe, check the transfer.

muP's promise (Yang et al. 2022, Tensor Programs V; with depth, Dey et al. 2025, CompleteP) is that the best lr and
multipliers of a narrow (and shallow) proxy are those of the wide target. This command does every step of using it:

1. the proxy: the target recipe at ``--proxy-width`` (default: the muP base width; heads kept, MLP scaled, as muP's
   base model) and, when the recipe scales depth (``model.mup.base_depth`` + ``depth_alpha``), ``--proxy-depth``;
2. a coarse-to-fine search on the proxy (:mod:`._mutransfer_plan`): lr over ×2 steps around the recipe's lr (widened
   by one step while the best sits on an edge; ``--lr-resolution 0.5`` adds the half-steps beside the best), the output
   and attention multipliers, weight decay when the recipe's muP wd rule makes it width-free, and a last look at the
   lr steps beside the best;
3. ``tuned.yaml``: the target recipe with the transferred values and a provenance block; ``report.md`` /
   ``report.json`` / ``report.png``;
4. ``--direct``: the coarse lr grid trained at the target (at the transferred multipliers), to measure the transfer
   and what it saved; ``--verify``:
   ``hf-optim train tuned.yaml`` as is, and at ×0.5 / ×2 its lr: is the transferred lr the best of the three?

Every run is a plain ``hf-optim train`` in a child process; ``results.jsonl`` makes the command resumable. The budget
(``--budget``, a fraction of the direct sweep's FLOPs) is checked before anything trains.

Example (docs/experiments/mutransfer)::

    hf-optim mutransfer recipes/demo/mutransfer_llama_w512.yaml --jobs 2 --direct --verify \\
        --out docs/experiments/mutransfer
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import _mutransfer_plan as plan
from . import _mutransfer_report as report
from . import _mutransfer_search as search
from . import schema
from ._mutransfer_trials import Trial, TrialError, TrialLog, recipe_digest, run_trials

STAGES = ("lr", "lr_fine", *plan.MULTIPLIER_FACTORS, "weight_decay", "lr_final")
MAX_EDGE_EXTENSIONS = 2


class Search:
    """The search state: target, proxy, the log of runs, and the incumbent best point."""

    def __init__(self, args: argparse.Namespace, log: Callable[[str], None]) -> None:
        self.args, self.log = args, log
        self.target = plan.load_target(args.recipe)
        self.proxy = plan.proxy_shape(self.target, args.proxy_width, args.proxy_depth)
        self.recipe_path = str(schema.resolve_path(args.recipe))
        self.digest = recipe_digest(self.target.recipe)
        self.out: Path = args.out
        self.grid = plan.lr_grid(self.target.lr, args.lr_span)
        self.proxy_flops = plan.run_flops(self.target, self.proxy)
        self.target_flops = plan.run_flops(self.target, self.target.shape)
        mup = self.target.mup
        self.start: search.Point = (
            self.grid[len(self.grid) // 2],
            float(mup.get("output_mult") or 1.0),
            float(mup.get("attn_mult") or 1.0),
            self.target.weight_decay,
        )
        self.steps = plan.refine_steps(args.lr_resolution)
        runs = plan.planned_runs(self.target, len(self.grid), args.seeds, args.lr_resolution)
        self.planned = sum(runs.values()) * self.proxy_flops
        self.direct_flops = len(self.grid) * args.seeds * self.target_flops
        plan.check_budget(self.planned, args.budget, self.direct_flops)
        self.store = TrialLog(self.out)  # the output folder appears only once every check has passed
        self.used: dict[str, dict[str, Any]] = {}  # this search's rows (a reused folder may hold others)

    def train(self, role: str, stage: str, points: Sequence[search.Point], shape: plan.Shape) -> list[dict[str, Any]]:
        flops = self.proxy_flops if role == "proxy" else self.target_flops
        trials = [
            (Trial(role, stage, shape, *point, seed=self.args.seed + k), flops)
            for point in points
            for k in range(self.args.seeds)
        ]
        return self.record(run_trials(
            trials, recipe_path=self.recipe_path, digest=self.digest, store=self.store, out=self.out,
            jobs=self.args.jobs, log=self.log,
        ))  # fmt: skip

    def record(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        self.used.update((row["key"], row) for row in rows)
        return rows

    def stage(self, name: str, points: Sequence[search.Point], incumbent: tuple[search.Point, float] | None):
        self.log(f"stage {name}: {len(points)} point(s) x {self.args.seeds} seed(s) on the proxy")
        best = search.choose(self.train("proxy", name, points, self.proxy), incumbent)
        self.log(f"  best so far: {dict(zip(search.FIELDS, best[0], strict=True))} loss {best[1]:.4f}")
        return best

    def run(self) -> tuple[search.Point, float]:
        _, out_mult, attn_mult, wd = self.start
        grid = list(self.grid)
        best = self.stage("lr", [(x, out_mult, attn_mult, wd) for x in grid], None)
        extra = self.args.seeds * self.proxy_flops  # one more lr point
        for extension in range(1, MAX_EDGE_EXTENSIONS + 1):  # an optimum on an edge may lie outside: step that way
            side = search.at_edge(grid, best[0][0])
            if not side or self.planned + extension * extra > self.args.budget * self.direct_flops:
                break
            grid.append(best[0][0] + side)
            best = self.stage("lr", [(grid[-1], out_mult, attn_mult, wd)], best)
        self.grid = sorted(grid)  # the direct sweep covers the extensions too
        if search.at_edge(grid, best[0][0]):
            self.log(f"  warning: the best proxy lr 2^{best[0][0]:g} is on the edge of the grid; widen --lr-span")
        if self.args.lr_resolution < 1:  # at x2 resolution the coarse grid already holds the neighbours
            best = self.stage("lr_fine", [(best[0][0] + d, *best[0][1:]) for d in self.steps], best)
        for name, factors in plan.MULTIPLIER_FACTORS.items():
            p, index = best[0], search.FIELDS.index(name)
            points = [tuple(p[i] * f if i == index else p[i] for i in range(4)) for f in factors]
            best = self.stage(name, points, best)
        if self.target.tunes_weight_decay:
            p = best[0]
            best = self.stage("weight_decay", [(*p[:3], p[3] * f) for f in plan.WD_FACTORS], best)
        best = self.stage("lr_final", [(best[0][0] + d, *best[0][1:]) for d in self.steps], best)
        return best

    def provenance(self, optimum: search.Point, proxy_loss: float) -> dict[str, Any]:
        return {
            "target_recipe": self.args.recipe,
            **plan.describe(self.target, self.proxy),
            "seeds": self.args.seeds,
            "coarse_log2_lr": list(self.grid),
            "lr_resolution": self.args.lr_resolution,
            "stages": {name: list(f) for name, f in plan.MULTIPLIER_FACTORS.items()},
            "optimum": dict(zip(search.FIELDS, optimum, strict=True)),
            "proxy_loss": round(proxy_loss, 5),
            "report": "report.md",
        }


def run_mutransfer(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) the whole command; return the report."""
    if isinstance(args.jobs, bool) or not isinstance(args.jobs, int) or args.jobs < 1:
        raise ValueError(f"--jobs must be an integer >= 1, got {args.jobs!r}.")
    if isinstance(args.seeds, bool) or not isinstance(args.seeds, int) or args.seeds < 1:
        raise ValueError(f"--seeds must be an integer >= 1, got {args.seeds!r}.")
    s = Search(args, log)
    log(
        f"mutransfer {args.recipe}: proxy width {s.proxy.width} x {s.proxy.layers} layers -> target width "
        f"{s.target.shape.width} x {s.target.shape.layers} layers; coarse log2 lr {s.grid[0]:g}..{s.grid[-1]:g}; "
        f"planned proxy search {s.planned / s.direct_flops:.1%} of a direct sweep's FLOPs (budget {args.budget:g})"
        f" -> {s.out}"
    )
    optimum, proxy_loss = s.run()
    tuned_path = s.out / "tuned.yaml"
    tuned = report.tuned_recipe(Path(s.recipe_path), dict(zip(search.FIELDS, optimum, strict=True)), s.out,
                                s.provenance(optimum, proxy_loss))  # fmt: skip
    report.write_tuned(tuned_path, tuned)
    schema.load(tuned_path)  # the emitted recipe must load as is
    log(f"wrote {tuned_path}")
    if args.direct:
        log(f"direct sweep at the target: {len(s.grid)} lr(s) x {args.seeds} seed(s)")
        # at the transferred multipliers and decay: the lr is compared like for like, and tuned.yaml's loss against
        # what tuning the lr at the target itself would give
        s.train("direct", "lr", [(x, *optimum[1:]) for x in s.grid], s.target.shape)
    if args.verify:
        verify(s, tuned_path, optimum)
    rows = list(s.used.values())
    summary = search.summarize(rows, STAGES)
    summary["settings"] = {
        "target_recipe": args.recipe,
        **plan.describe(s.target, s.proxy),
        "seeds": args.seeds,
        "lr_resolution": args.lr_resolution,
        "stages": list(STAGES),
        "budget": args.budget,
        "runs": sorted(s.used),  # the keys in results.jsonl this report is computed from
    }
    written = report.write_report(s.out, summary)
    log("report: " + ", ".join(str(p) for p in written))
    log(conclusion(summary))
    return summary


def conclusion(summary: dict[str, Any]) -> str:
    """The result in a few lines: the transferred values, and what --direct / --verify found."""
    o = summary["optimum"]
    lines = [
        f"transferred: lr 2^{o['log2_lr']:g} = {2.0 ** o['log2_lr']:.4g}, output_mult {o['output_mult']:g}, "
        f"attn_mult {o['attn_mult']:g}, weight_decay {o['weight_decay']:g}"
    ]
    if "direct" in summary:
        d, c = summary["direct"], summary["compute"]
        lines.append(
            f"direct sweep at the target: best lr 2^{d['best_log2_lr']:g} (loss {d['best_loss']:.4f}), "
            f"{d['transfer_gap_grid_steps']:g} grid step(s) from the transferred lr; the proxy search cost "
            f"{c['proxy_over_direct_flops']:.1%} of its FLOPs ({c['proxy_over_direct_seconds']:.1%} of its seconds)"
        )
    if "verify" in summary:
        v = summary["verify"]
        losses = ", ".join(f"{k} {x:.4f}" for k, x in v["loss"].items())
        lines.append(f"verify at the target ({losses}): the transferred lr is "
                     + ("the best of the three" if v["transferred_is_best"] else f"not the best ({v['best']} is)"))  # fmt: skip
    return "\n".join(lines)


def verify(s: Search, tuned_path: Path, optimum: search.Point) -> None:
    """The target as ``hf-optim train tuned.yaml`` (no overrides) and at x0.5 / x2 the transferred lr."""
    tuned = schema.load(tuned_path)
    digest = recipe_digest(tuned)
    tuned_seed = int((tuned.get("run") or {}).get("seed", 0))
    shape = s.target.shape
    seeds = [s.args.seed + k for k in range(s.args.seeds)]
    # the recipe's own seed runs with no override at all; other seeds add only run.seed
    trials = [
        (Trial("verify", "tuned", shape, *optimum, seed=seed, quiet=False, plain=seed == tuned_seed), s.target_flops)
        for seed in seeds
    ]
    trials += [
        (Trial("verify", "tuned", shape, optimum[0] + d, *optimum[1:], seed=seed), s.target_flops)
        for d in (-1.0, 1.0)
        for seed in seeds
    ]
    s.log("verify at the target: tuned.yaml as is, and at x0.5 / x2 its lr")
    s.record(run_trials(trials, recipe_path=str(tuned_path), digest=digest, store=s.store, out=s.out,
                        jobs=s.args.jobs, log=s.log))  # fmt: skip


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="hf-optim mutransfer",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("recipe", help="target recipe (file or bundled name) with model.mup.base_width")
    parser.add_argument("--proxy-width", type=int, default=None, help="proxy hidden size (default: muP base width)")
    parser.add_argument("--proxy-depth", type=int, default=None, help="proxy layers (needs model.mup.base_depth)")
    parser.add_argument("--lr-span", type=int, default=4, help="coarse lr grid: this many x2 steps either side")
    parser.add_argument(
        "--lr-resolution",
        type=float,
        default=1.0,
        help="log2 step of the lr refinement: 1 (x2, default) or 0.5 (adds the half-steps; see docs/mup.md sec. 7)",
    )
    parser.add_argument("--seeds", type=int, default=1, help="seeds per point (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    parser.add_argument(
        "--budget", type=float, default=0.25, help="proxy FLOPs as a fraction of a direct sweep's (default 0.25)"
    )
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (default 1)")
    parser.add_argument("--direct", action="store_true", help="also sweep the coarse lr grid at the target")
    parser.add_argument("--verify", action="store_true", help="train tuned.yaml and its lr x0.5 / x2 at the target")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default mutransfer_out/<recipe>)")
    args = parser.parse_args(argv)
    args.out = args.out or Path("mutransfer_out") / Path(args.recipe).stem
    return args


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through run_trials, which kills the running trials' sessions


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        run_mutransfer(args, log=lambda message: print(message, flush=True))
    except ValueError as error:  # recipe errors included (RecipeError is a ValueError)
        print(f"hf-optim mutransfer: {error}", file=sys.stderr)
        return 2
    except TrialError as error:  # e.g. the optimizer refuses a combination only the built model reveals
        print(f"hf-optim mutransfer: {error}", file=sys.stderr)
        return 1
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
