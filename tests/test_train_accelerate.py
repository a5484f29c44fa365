"""`accelerate launch` with the bundled DDP config: two CPU processes (gloo), a few steps, then a resumed run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.hidden_size=32", "model.num_layers=1", "model.intermediate_size=64", "model.mup.base_width=16",
        "data.block_size=32", "data.max_tokens=20000", "run.batch_size=4", "run.eval_batches=1",
        "run.logging_steps=2", "run.eval_steps=100", "run.save_steps=4", "schedule.warmup_steps=2"]


def _launch(out: Path, *extra: str) -> subprocess.CompletedProcess:
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--config_file",
           str(ROOT / "recipes/accelerate/ddp.yaml"), "-m", "recipes.train", "demo", *TINY, *extra,
           "--output-dir", str(out)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_ddp_two_processes_and_resume(tmp_path):
    out = tmp_path / "ddp"
    first = _launch(out, "run.max_steps=8")
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads((out / "metrics.json").read_text())["summary"]
    assert summary["world_size"] == 2 and summary["steps"] == 8
    assert (out / "checkpoint-8" / "optimizer.pt").is_file()
    first_losses = {r["step"]: r["loss"] for r in json.loads((out / "metrics.json").read_text())["log_history"]
                    if "loss" in r}

    second = _launch(out, "run.max_steps=12", "--resume")
    assert second.returncode == 0, second.stderr[-3000:]
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed["summary"]["steps"] == 12 and resumed["summary"]["initial_eval_loss"] is None
    losses = {r["step"]: r["loss"] for r in resumed["log_history"] if "loss" in r}
    # Steps 1..8 come from checkpoint-8's trainer state (not re-trained), steps 10 and 12 are new.
    assert {k: losses[k] for k in first_losses} == first_losses and {10, 12} <= set(losses)
