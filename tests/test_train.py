"""`hf-optim train` end to end on a test-sized model: loss decreases, outputs are written, --resume continues."""

from __future__ import annotations

import json

import pytest

from recipes import train

TINY = ["model.hidden_size=32", "model.num_layers=1", "model.intermediate_size=64", "model.mup.base_width=16",
        "data.block_size=32", "data.max_tokens=40000", "run.batch_size=8", "run.eval_batches=2",
        "run.logging_steps=5", "run.eval_steps=100", "run.save_steps=15", "schedule.warmup_steps=5"]


@pytest.mark.slow
def test_train_demo_tiny_then_resume(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(["demo", *TINY, "run.max_steps=30", "--output-dir", str(out), "--threads", "1"]) == 0
    summary = json.loads((out / "metrics.json").read_text())["summary"]
    assert summary["steps"] == 30
    assert summary["final_eval_loss"] < summary["initial_eval_loss"] - 0.3
    for name in ("metrics.csv", "loss.png", "checkpoint-30/optimizer.pt", "checkpoint-15/trainer_state.json"):
        assert (out / name).is_file(), name
    assert "outputs in" in capsys.readouterr().out

    assert train.main(["demo", *TINY, "run.max_steps=40", "--output-dir", str(out), "--threads", "1",
                       "--resume"]) == 0
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed["summary"]["steps"] == 40 and resumed["summary"]["initial_eval_loss"] is None
    steps = [r["step"] for r in resumed["log_history"] if "loss" in r]
    assert steps[0] == 1 and steps[-1] == 40  # history of the first run carried over from checkpoint-30


def test_mup_with_weight_decay_needs_explicit_rule(tmp_path):
    from recipes.schema import RecipeError

    with pytest.raises(RecipeError, match="wd_rule"):
        train.main(["demo", "model.mup.wd_rule=null", "--output-dir", str(tmp_path)])
