"""`accelerate launch` with the bundled configs.

- DDP: two CPU processes (gloo), a few steps, then a resumed run, three times in a row beside a CPU-burning process;
  the first run goes through the installed ``hf-optim`` console script (the command the docs show), the resumed one
  through ``-m hf_optim.runner.train``. Launched through tests/_launch.py: a free port, no hang, no orphan.
- DeepSpeed ZeRO-2/3: no DeepSpeed on CPU, so the test follows the configs' values through accelerate's launcher
  and the Trainer's 'auto' filling, which is where hard-coded values used to conflict with the recipe.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import _launch
import pytest
import yaml
from _launch import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = [
    "model.hidden_size=32",
    "model.num_layers=1",
    "model.intermediate_size=64",
    "model.mup.base_width=16",
    "data.block_size=32",
    "data.max_tokens=20000",
    "run.batch_size=4",
    "run.eval_batches=1",
    "run.logging_steps=2",
    "run.eval_steps=100",
    "run.save_steps=4",
    "schedule.warmup_steps=2",
]


def _launch_ddp(out: Path, *extra: str, entry: str, timeout: float = 300) -> _launch.Launch:
    """One ``accelerate launch`` of 2 CPU ranks on a free port, run through tests/_launch.py (no hang, no orphan)."""
    accelerate = shutil.which("accelerate", path=str(BIN)) or "accelerate"
    if entry == "console-script":
        # `accelerate launch ... $(which hf-optim) train ...`: the console script is a Python file, run as a script.
        script = shutil.which("hf-optim", path=str(BIN))
        assert script, f"hf-optim console script not found in {BIN}"
        target = [script, "train"]
    else:
        target = ["-m", "hf_optim.runner.train"]
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "1",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
    }
    # A port of our own: accelerate's default 29500 is shared by every launch on the machine (parallel test
    # workers, other users), and accelerate's fallback when it is taken is a check-then-bind race.
    cmd = [
        accelerate,
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--main_process_port",
        str(free_port()),
        "--config_file",
        str(ROOT / "recipes/accelerate/ddp.yaml"),
        *target,
        "demo",
        *TINY,
        *extra,
        "--output-dir",
        str(out),
    ]
    return _launch.run(cmd, timeout=timeout, env=env, cwd=ROOT)


def _check_clean_exit(result: _launch.Launch) -> None:
    assert result.returncode == 0, result.tail()
    # The symptom of a rank leaving with a live gloo group (the launcher then SIGTERMs the other rank).
    assert "terminate called" not in result.stderr and "SIGABRT" not in result.stderr, result.tail()


@contextlib.contextmanager
def _cpu_burner():
    """A process spinning on one core beside the launch, as on a loaded CI machine; killed afterwards, and it stops
    by itself when this process dies (a pytest killed from outside runs no ``finally``)."""
    spin = "import os\nparent = os.getppid()\nwhile os.getppid() == parent:\n    for _ in range(100000): pass"
    burner = subprocess.Popen([sys.executable, "-c", spin], start_new_session=True)
    try:
        yield
    finally:
        burner.kill()
        burner.wait()


def _train_then_resume(out: Path, *, detailed: bool) -> tuple[float, float]:
    first = _launch_ddp(out, "run.max_steps=8", entry="console-script")
    _check_clean_exit(first)
    summary = json.loads((out / "metrics.json").read_text())["summary"]
    assert summary["world_size"] == 2 and summary["steps"] == 8
    assert (out / "checkpoint-8" / "optimizer.pt").is_file()
    assert (out / "loss.png").stat().st_size > 0 and (out / "metrics.csv").is_file()
    first_history = json.loads((out / "metrics.json").read_text())["log_history"]
    first_losses = {r["step"]: r["loss"] for r in first_history if "loss" in r}
    (out / "loss.png").unlink()
    if detailed:
        # Rank 0 alone prints the summary (one "done:" line, not one per process).
        assert first.stdout.count("[hf-optim] done: 8 steps") == 1, first.stdout[-3000:]

    second = _launch_ddp(out, "run.max_steps=12", "--resume", entry="module")
    _check_clean_exit(second)
    resumed = json.loads((out / "metrics.json").read_text())
    # This run's steps (9..12), the step reached, and the step-0 validation loss kept from the first run.
    assert resumed["summary"]["steps"] == 4 and resumed["summary"]["global_step"] == 12
    assert resumed["summary"]["resumed_from_step"] == 8
    assert resumed["summary"]["initial_eval_loss"] == summary["initial_eval_loss"] is not None
    assert {"step": 0, "eval_loss": summary["initial_eval_loss"]}.items() <= resumed["log_history"][0].items()
    assert (out / "loss.png").stat().st_size > 0  # written again by the resumed run
    losses = {r["step"]: r["loss"] for r in resumed["log_history"] if "loss" in r}
    # Steps 1..8 come from checkpoint-8's trainer state (not re-trained), steps 10 and 12 are new.
    assert {k: losses[k] for k in first_losses} == first_losses and {10, 12} <= set(losses)
    if detailed:
        assert second.stdout.count("[hf-optim] done: 4 steps (steps 9-12, resumed from checkpoint-8)") == 1, (
            second.stdout[-3000:]
        )
    return first.seconds, second.seconds


@pytest.mark.slow
def test_ddp_train_then_resume_three_times_beside_a_cpu_burner(tmp_path):
    """2-rank DDP train, then ``--resume``, three times in a row with a core kept busy: every launch exits 0 in time.

    This is the run that used to hang (rank 1 left in a futex wait after rank 0 exited). Documented slow test:
    about 1-3 min per round on a loaded 2-core machine; each launch has 300 s.
    """
    times = []
    with _cpu_burner():
        for round_ in range(3):
            times.append(_train_then_resume(tmp_path / f"ddp{round_}", detailed=round_ == 0))
    print("launch seconds (train, resume) per round:", [(round(a), round(b)) for a, b in times])


def _deepspeed_config_through_accelerate(config: Path, monkeypatch) -> dict:
    """The DeepSpeed config dict accelerate builds from one of our accelerate YAMLs (what `accelerate launch` does)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    args = launch_command_parser().parse_args(["--config_file", str(config), "train.py"])
    args, defaults, _ = _validate_launch_command(args)
    assert args.use_deepspeed
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
    _, env = prepare_deepspeed_cmd_env(args)
    for key, value in env.items():
        if key.startswith("ACCELERATE_"):
            monkeypatch.setenv(key, value)
    return DeepSpeedPlugin().deepspeed_config


def _trainer_fill(ds_config: dict, *, grad_accum: int, max_grad_norm: float) -> tuple[dict, list[str]]:
    """transformers' HfTrainerDeepSpeedConfig.trainer_config_process: fills 'auto', records mismatches."""
    from accelerate.utils.deepspeed import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    # Without the deepspeed package transformers' class derives from `object` (its __init__ then fails), but the
    # filling logic is plain Python over accelerate's config class: rebase transformers' own methods onto it.
    methods = {
        k: v
        for k, v in vars(HfTrainerDeepSpeedConfig).items()
        if k in ("is_auto", "fill_match", "fill_only", "trainer_config_process")
    }
    hf = type("TrainerDeepSpeedConfig", (HfDeepSpeedConfig,), methods)(json.loads(json.dumps(ds_config)))
    hf.mismatches, hf._dtype = [], None
    args = SimpleNamespace(
        world_size=2,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=grad_accum,
        max_grad_norm=max_grad_norm,
        learning_rate=1e-3,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        weight_decay=0.0,
        save_on_each_node=False,
        fp16=False,
        fp16_full_eval=False,
        bf16=False,
        bf16_full_eval=False,
    )
    hf.trainer_config_process(args)
    return hf.config, hf.mismatches


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("grad_accum, max_grad_norm", [(1, 1.0), (4, 0.5), (2, 0.0)])
def test_deepspeed_configs_follow_the_recipe(monkeypatch, stage, grad_accum, max_grad_norm):
    path = ROOT / f"recipes/accelerate/deepspeed_zero{stage}.yaml"
    ds_section = yaml.safe_load(path.read_text())["deepspeed_config"]
    for key in ("gradient_accumulation_steps", "gradient_clipping"):
        assert ds_section.get(key, "auto") == "auto", f"{path.name}: {key} is hard-coded"
    assert "optimizer" not in ds_section and "scheduler" not in ds_section
    ds_config = _deepspeed_config_through_accelerate(path, monkeypatch)
    assert ds_config["zero_optimization"]["stage"] == stage
    filled, mismatches = _trainer_fill(ds_config, grad_accum=grad_accum, max_grad_norm=max_grad_norm)
    assert mismatches == []
    # run.grad_accum and training.max_grad_norm (0 = no clipping) reach DeepSpeed unchanged.
    assert filled["gradient_accumulation_steps"] == grad_accum
    assert filled.get("gradient_clipping", 0.0) == max_grad_norm
    assert filled["train_batch_size"] == 2 * 4 * grad_accum


def test_hard_coded_deepspeed_values_would_conflict(tmp_path, monkeypatch):
    """The check above can fail: the old configs (accumulation 1, clipping 1.0) mismatch a recipe that differs."""
    cfg = yaml.safe_load((ROOT / "recipes/accelerate/deepspeed_zero2.yaml").read_text())
    cfg["deepspeed_config"].update(gradient_accumulation_steps=1, gradient_clipping=1.0)
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump(cfg))
    _, mismatches = _trainer_fill(
        _deepspeed_config_through_accelerate(old, monkeypatch), grad_accum=4, max_grad_norm=0.5
    )
    assert any("gradient_accumulation_steps" in m for m in mismatches)
    assert any("gradient_clipping" in m for m in mismatches)
