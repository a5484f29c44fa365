"""One mutransfer trial = one ``hf-optim train`` of the target recipe with a few overrides, in its own process.

A trial runs the same code path as ``hf-optim train RECIPE key=value ...`` (a subprocess of this interpreter, one
torch thread), so the losses of the search, of the direct sweep and of ``--verify`` are those a user gets from the
command line. Results go to ``results.jsonl`` (append-only, one line per trial, keyed by a hash of the recipe and the
overrides): re-running the command skips every finished trial, like ``hf-optim sweep``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ._mutransfer_plan import Shape

#: A trial never writes checkpoints and evaluates only at its start and end: its loss is all the search needs.
_LIVE: set[subprocess.Popen] = set()  # running children, killed (whole session) when the command is interrupted
_LIVE_LOCK = threading.Lock()

QUIET = ["run.save_steps=1000000000", "run.eval_steps=1000000000", "run.logging_steps=1000000000"]


class TrialError(RuntimeError):
    """A trial's ``hf-optim train`` failed; the message ends with its log's last lines."""


@dataclass(frozen=True)
class Trial:
    """The settings of one run; ``role`` is ``proxy`` (the search), ``direct`` (the target sweep) or ``verify``."""

    role: str
    stage: str
    shape: Shape
    log2_lr: float
    output_mult: float
    attn_mult: float
    weight_decay: float
    seed: int
    quiet: bool = True  # False: checkpoints and evaluations as the recipe says
    plain: bool = False  # True: no overrides at all (the recipe already holds these values: tuned.yaml as is)

    def overrides(self) -> list[str]:
        if self.plain:
            return []
        out = [
            *self.shape.overrides(),
            f"optimizer.lr={2.0**self.log2_lr!r}",
            f"model.mup.output_mult={self.output_mult!r}",
            f"model.mup.attn_mult={self.attn_mult!r}",
            f"optimizer.weight_decay={self.weight_decay!r}",
            f"run.seed={self.seed}",
        ]
        return out + (QUIET if self.quiet else [])

    def key(self, recipe_digest: str) -> str:
        payload = json.dumps([recipe_digest, self.overrides()])
        return hashlib.sha1(payload.encode()).hexdigest()[:16]

    def describe(self) -> str:
        return (
            f"{self.role}/{self.stage} w={self.shape.width} L={self.shape.layers} lr=2^{self.log2_lr:g} "
            f"out={self.output_mult:g} attn={self.attn_mult:g} wd={self.weight_decay:g} seed={self.seed}"
        )


def recipe_digest(recipe: dict[str, Any]) -> str:
    """A hash of the resolved recipe: editing it invalidates the recorded trials, renaming its file does not, nor does
    tuned.yaml's provenance (it records the search, e.g. its seeds, and changes when a search is extended)."""
    content = {k: v for k, v in recipe.items() if not k.startswith("_") and k != "provenance"}
    return hashlib.sha1(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]


class TrialLog:
    """``results.jsonl``: every finished trial, read back at start so that a re-run resumes."""

    def __init__(self, out: Path) -> None:
        self.path = out / "results.jsonl"
        (out / "trials").mkdir(parents=True, exist_ok=True)
        # each trial's folder (log, metrics, the verify run's checkpoint) is scratch: kept out of git
        (out / "trials" / ".gitignore").write_text("*\n")
        self.rows: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    self.rows[row["key"]] = row

    def add(self, row: dict[str, Any]) -> None:
        self.rows[row["key"]] = row
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")


def _train_command(recipe_path: str, trial: Trial, out: Path) -> list[str]:
    return [sys.executable, "-m", "hf_optim.runner.train", recipe_path, *trial.overrides(), "--output-dir", str(out)]


def run_one(recipe_path: str, trial: Trial, out: Path, flops: float) -> dict[str, Any]:
    """Train one trial in a child process (its own session: an interrupt takes its whole group down)."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with (out / "log.txt").open("w") as log:
        child = subprocess.Popen(
            _train_command(recipe_path, trial, out), stdout=log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,
        )  # fmt: skip
        with _LIVE_LOCK:
            _LIVE.add(child)
        try:
            code = child.wait()
        finally:
            with _LIVE_LOCK:
                _LIVE.discard(child)
    if code != 0:
        tail = (out / "log.txt").read_text()[-2000:]
        raise TrialError(f"trial {trial.describe()} failed (exit {code}); its log {out / 'log.txt'} ends:\n{tail}")
    summary = json.loads((out / "metrics.json").read_text())["summary"]
    loss = summary["final_eval_loss"]
    diverged = not math.isfinite(loss) or loss > 1.5 * summary["uniform_loss"]
    return {
        **{k: v for k, v in asdict(trial).items() if k != "shape"},
        "width": trial.shape.width,
        "layers": trial.shape.layers,
        "heads": trial.shape.heads,
        "intermediate": trial.shape.intermediate,
        "val_loss": loss if math.isfinite(loss) else None,
        "diverged": diverged,
        "seconds": summary["seconds"],
        "flops": flops,
    }


def _kill_live() -> None:
    with _LIVE_LOCK:
        children = list(_LIVE)
    for child in children:
        with contextlib.suppress(ProcessLookupError):  # it may have ended meanwhile
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()


def run_trials(
    trials: Iterable[tuple[Trial, float]],
    *,
    recipe_path: str,
    digest: str,
    store: TrialLog,
    out: Path,
    jobs: int,
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Run the trials not in ``store`` (``jobs`` at a time); return every trial's row, in the order given."""
    trials = list(trials)
    todo = [(t, f) for t, f in trials if t.key(digest) not in store.rows]
    done_before = len(trials) - len(todo)
    if todo:
        log(f"  {len(todo)} run(s) to train ({done_before} already in {store.path.name})")

    def work(item: tuple[Trial, float]) -> dict[str, Any]:
        trial, flops = item
        key = trial.key(digest)
        row = {"key": key, **run_one(recipe_path, trial, out / "trials" / key, flops)}
        return row

    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        for index, row in enumerate(pool.map(work, todo), 1):
            store.add(row)
            status = "DIVERGED" if row["diverged"] else f"val {row['val_loss']:.4f}"
            log(f"  [{index}/{len(todo)}] {row['role']}/{row['stage']} w={row['width']} L={row['layers']} "
                f"lr=2^{row['log2_lr']:g} out={row['output_mult']:g} attn={row['attn_mult']:g} "
                f"wd={row['weight_decay']:g} seed={row['seed']}: {status} ({row['seconds']:.0f} s)")  # fmt: skip
    except BaseException:  # Ctrl-C or a failed trial: no child may outlive the command
        pool.shutdown(wait=False, cancel_futures=True)
        _kill_live()
        raise
    pool.shutdown()
    return [store.rows[t.key(digest)] for t, _ in trials]
