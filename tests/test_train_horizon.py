"""Recipe schedules fitted to the run's length (hf_optim/runner/horizon.py) and what `hf-optim train` reports.

References are the papers' numbers: LLaMA-2 warms up for 2000 steps of a 2T-token run at 4M tokens per step
(500k steps) to a peak lr of 3e-4 (7B); T5 holds 1e-2 for 10^4 of 2^19 steps; the demo recipe warms up for 30 of its
300 steps. The expected schedules are written out here from those numbers, not taken from the code under test.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from hf_optim.runner import horizon, schema, train

TINY = [
    "model.hidden_size=32",
    "model.num_layers=1",
    "model.intermediate_size=64",
    "data.block_size=32",
    "data.max_tokens=20000",
    "run.batch_size=4",
    "run.eval_batches=1",
    "run.logging_steps=1",
    "run.eval_steps=100",
    "run.save_steps=100",
]
LLAMA2_STEPS = 2e12 / 4e6  # Touvron et al. 2023b: 2T tokens, 4M-token batches
LLAMA2_PEAK = 3e-4  # 7B, Table 1


def _fit(ref: str, overrides: list[str], steps: int) -> horizon.Fit:
    recipe = schema.load(ref, overrides)
    file_steps = (schema.load(ref).get("run") or {}).get("max_steps")
    size = (recipe.get("run") or {}).get("size")
    return horizon.fit(
        recipe,
        steps,
        size=size,
        horizon=horizon.recipe_horizon(recipe, size, file_steps),
        fixed=horizon.fixed_keys(overrides),
    )


def _cosine_to_floor(k: int, warmup: int, total: int, floor: float) -> float:
    if k < warmup:
        return k / warmup
    p = min(1.0, (k - warmup) / (total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))


@pytest.mark.parametrize("steps", [60, 200, 5000])
def test_llama2_warmup_keeps_its_share_of_the_run(steps):
    fit = _fit("llm/llama2", [], steps)
    assert fit.recipe_horizon == LLAMA2_STEPS and fit.factor == pytest.approx(steps / LLAMA2_STEPS)
    warmup = round(2000 * steps / LLAMA2_STEPS)  # 0, 1, 20 steps
    assert fit.steps["num_warmup_steps"] == [2000, warmup]
    mult = _multiplier(fit)
    for k in (0, 1, steps // 3, steps - 1):
        assert mult(k) == pytest.approx(_cosine_to_floor(k, warmup, steps, 0.1), abs=1e-12)
    assert fit.peak_multiplier == pytest.approx(1.0)
    assert "warm-up 2000 -> " in fit.announcement() and f"recipe horizon {int(LLAMA2_STEPS)}" in fit.announcement()


def _multiplier(fit: horizon.Fit):
    from hf_optim.runner.schedules import make_multiplier

    return make_multiplier(fit.schedule, **fit.kwargs)


def test_scale_false_keeps_published_steps_and_warns():
    fit = _fit("llm/llama2", ["schedule.scale=false"], 60)
    assert fit.factor == 1.0 and fit.steps["num_warmup_steps"] == [2000, 2000] and fit.announcement() is None
    # the highest lr of a 60-step run inside a 2000-step linear warm-up: update k = 59
    assert fit.peak_multiplier == pytest.approx(59 / 2000) and fit.peak_step == 59
    warning = fit.warning(LLAMA2_PEAK)
    assert warning is not None and f"{LLAMA2_PEAK * 59 / 2000:.3g} of peak lr 0.0003" in warning
    assert "schedule.scale=false" in warning


def test_command_line_steps_are_the_runs_own_and_not_scaled():
    fit = _fit("llm/llama2", ["schedule.warmup_steps=20"], 200)
    assert fit.steps["num_warmup_steps"] == [20, 20] and fit.announcement() is None and fit.warning(3e-4) is None


def test_demo_horizon_is_its_own_run_length():
    fit = _fit("demo", [], 20)
    assert fit.recipe_horizon == 300 and fit.steps["num_warmup_steps"] == [30, 2]  # 30 x 20 / 300
    assert _fit("demo", [], 300).factor == 1.0 and _fit("demo", [], 600).steps["num_warmup_steps"] == [30, 30]
    # llama2_tiny_mup inherits LLaMA-2's schedule but states its own 300 steps and 30-step warm-up
    assert _fit("llama2_tiny_mup", [], 300).factor == 1.0


def test_t5_plateau_is_compressed_with_the_shape_kept():
    total = 2**19
    fit = _fit("llm/t5", [], 1000)
    plateau = round(1e4 * 1000 / total)
    assert fit.steps["plateau_steps"] == [10_000, plateau]
    mult = _multiplier(fit)
    # 1/sqrt(max(k, n)) normalised by its plateau: the last step keeps the paper's ratio sqrt(1e4 / 2^19)
    assert mult(999) == pytest.approx(math.sqrt(plateau / 999))
    assert mult(999) == pytest.approx(math.sqrt(1e4 / total), rel=0.15)


def _run(capsys, tmp_path: Path, *argv: str, options: tuple[str, ...] = ()) -> tuple[dict, str, str]:
    out = tmp_path / "run"
    assert train.main([*argv, *TINY, "--output-dir", str(out), *options]) == 0
    printed = capsys.readouterr()
    return json.loads((out / "metrics.json").read_text()), printed.out, printed.err


def _printed_peak(stdout: str) -> float:
    match = re.search(r"peak lr ([0-9.e+-]+)", stdout)
    assert match, stdout[-2000:]
    return float(match.group(1))


@pytest.mark.slow
def test_llama2_short_run_reaches_its_printed_peak(tmp_path, capsys):
    metrics, out, err = _run(capsys, tmp_path, "llm/llama2", "run.max_steps=60")
    peak = _printed_peak(out)
    assert peak == pytest.approx(LLAMA2_PEAK)
    logged = [r["learning_rate"] for r in metrics["log_history"] if "learning_rate" in r]
    assert len(logged) == 60 and max(logged) >= 0.95 * peak
    assert "schedule compressed to this run: warm-up 2000 -> 0 steps" in out
    schedule = metrics["summary"]["schedule"]
    assert schedule["recipe_horizon"] == LLAMA2_STEPS and schedule["steps"]["num_warmup_steps"] == [2000, 0]
    assert metrics["summary"]["peak_lr"] == pytest.approx(LLAMA2_PEAK)
    # published recipes run one torch thread per process on CPU unless told otherwise
    assert "torch threads: 1, default on CPU" in out and metrics["summary"]["torch_threads"] == 1
    assert "warning" not in err


def test_scale_false_run_warns_and_prints_the_peak_it_reaches(tmp_path, capsys):
    metrics, out, err = _run(
        capsys, tmp_path, "llm/llama2", "run.max_steps=4", "schedule.scale=false", options=("--threads", "1")
    )
    assert "[hf-optim] warning: this run reaches only" in err and "schedule.scale=false" in err
    peak = _printed_peak(out)
    assert peak == pytest.approx(float(f"{LLAMA2_PEAK * 3 / 2000:.3g}"))  # updates k = 0..3 of a 2000-step warm-up
    logged = [r["learning_rate"] for r in metrics["log_history"] if "learning_rate" in r]
    assert max(logged) <= LLAMA2_PEAK * 4 / 2000 + 1e-15
    assert metrics["summary"]["schedule"]["scale"] is False


def test_default_output_folder_is_the_recipes_name_as_documented():
    settings = train._settings(train.parse_args(["demo"]))
    assert settings["out"] == Path("runs") / "shakespeare_mup_llama_adafactor"
    docs = (Path(__file__).parents[1] / "docs" / "recipes.md").read_text()
    assert "runs/shakespeare_mup_llama_adafactor" in docs
