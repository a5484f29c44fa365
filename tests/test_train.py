"""`hf-optim train` end to end on a test-sized model: loss decreases, outputs are written, --resume continues."""

from __future__ import annotations

import json
import math
import threading

import pytest
import torch

from hf_optim.runner import _train_model, train

TINY = [
    "model.hidden_size=32",
    "model.num_layers=1",
    "model.intermediate_size=64",
    "model.mup.base_width=16",
    "data.block_size=32",
    "data.max_tokens=40000",
    "run.batch_size=8",
    "run.eval_batches=2",
    "run.logging_steps=5",
    "run.eval_steps=15",
    "run.save_steps=15",
    "schedule.warmup_steps=5",
]


@pytest.mark.slow
def test_train_demo_tiny_then_resume(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(["demo", *TINY, "run.max_steps=30", "--output-dir", str(out), "--threads", "1"]) == 0
    summary = json.loads((out / "metrics.json").read_text())["summary"]
    assert summary["steps"] == 30
    assert summary["final_eval_loss"] < summary["initial_eval_loss"] - 0.3
    for name in ("metrics.csv", "loss.png", "checkpoint-30/optimizer.pt", "checkpoint-15/trainer_state.json"):
        assert (out / name).is_file(), name
    printed = capsys.readouterr()
    # The closing summary names the loss drop, the outputs folder and the PNG; the bar prints one short line per log.
    assert f"loss curve: {(out / 'loss.png').resolve()}" in printed.out
    assert f"outputs:    {out.resolve()}" in printed.out
    assert f"{summary['initial_eval_loss']:.3f} at step 0 -> {summary['final_eval_loss']:.3f} at step 30" in printed.out
    terminal = printed.out + printed.err
    assert "step 15/30  validation loss" in terminal and "step  5/30  loss " in terminal
    assert "lr/group_0" not in terminal  # per-group values go to metrics.json, not the terminal
    # no tqdm monitor (a daemon thread) is left running for the interpreter's exit: see runner/_shutdown.py
    assert not [t for t in threading.enumerate() if t.name == "tqdm_monitor" and t.is_alive()]

    assert train.main(["demo", *TINY, "run.max_steps=40", "--output-dir", str(out), "--threads", "1", "--resume"]) == 0
    resumed = json.loads((out / "metrics.json").read_text())
    # The summary counts this run's 10 steps; the step-0 validation loss survives in checkpoint-30's trainer state.
    assert resumed["summary"]["steps"] == 10 and resumed["summary"]["global_step"] == 40
    assert resumed["summary"]["initial_eval_loss"] == summary["initial_eval_loss"]
    steps = [r["step"] for r in resumed["log_history"] if "loss" in r]
    assert steps[0] == 1 and steps[-1] == 40  # history of the first run carried over from checkpoint-30
    assert next(r["step"] for r in resumed["log_history"] if "eval_loss" in r) == 0  # loss.png's step-0 point
    printed = capsys.readouterr().out
    assert "done: 10 steps (steps 31-40, resumed from checkpoint-30)" in printed
    assert f"{summary['initial_eval_loss']:.3f} at step 0 -> " in printed


def test_a_launched_rank_keeps_its_trainer_until_it_exits(tmp_path, monkeypatch):
    """Under a launcher the Trainer (which holds the gloo process group through DDP's Reducer) must still be alive
    when the rank ends with os._exit: freed earlier, ~ProcessGroupGloo can deadlock with gloo's runLoop thread over
    the GIL (hf_optim/runner/_shutdown.py). An in-process call (no exit) releases it."""
    import gc
    import weakref

    from transformers import Trainer

    from hf_optim.runner import _shutdown

    seen = []

    def fake_end(code):  # what a launched rank holds at the moment it would call os._exit
        gc.collect()
        seen.append([(isinstance(obj, Trainer), weakref.ref(obj)) for obj in _shutdown._KEPT])

    monkeypatch.setattr(_shutdown, "_world_size", lambda: 2)
    monkeypatch.setattr(_shutdown, "end_launched_process", fake_end)
    out = tmp_path / "run"
    argv = ["demo", *TINY, "run.max_steps=2", "--output-dir", str(out), "--threads", "1"]
    assert train.main(argv, exit_process=True) == 0
    (kept,) = seen
    assert [is_trainer for is_trainer, _ in kept] == [True]
    gc.collect()
    assert _shutdown._KEPT == [] and kept[0][1]() is None  # released once main returns


def _refused(capsys, tmp_path, *argv: str) -> str:
    """Run ``hf-optim train`` with a bad recipe: exit status 2, one clean line on stderr, nothing written."""
    out = tmp_path / "out"
    assert train.main([*argv, "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hf-optim train: "), err
    assert not out.exists()
    return err[0]


@pytest.mark.parametrize("value", ["0", "-2", "1.5"])
def test_bad_thread_count_is_refused(tmp_path, capsys, value):
    assert "run.threads" in _refused(capsys, tmp_path, "demo", f"run.threads={value}")


def test_mup_with_weight_decay_needs_explicit_rule(tmp_path, capsys):
    assert "wd_rule" in _refused(capsys, tmp_path, "demo", "model.mup.wd_rule=null")


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["demo", "data.val_fraction=0"], "data.val_fraction=0"),  # was KeyError 'eval_loss' after building the model
        (["demo", "data.val_fraction=0.0001"], "fewer than one block of data.block_size=128"),
        (["demo", "run.eval_batches=0"], "run.eval_batches must be an integer >= 1, got 0"),
        (
            ["demo", "schedule.warmup_fraction=1.0", "schedule.warmup_steps=null"],
            "schedule.warmup_fraction must be in [0, 1)",
        ),
        (["llm/llama2", "sizes.7X.lr=1e-3"], "unknown size '7X'"),
        (["llm/llama2", "run.size=7X"], "Did you mean '7B'"),
        (["demo", "run.max_stepz=3"], "Did you mean 'run.max_steps'"),
        (["no_such_recipe"], "neither a file nor a bundled recipe"),
        (["demo", "model.num_heads=3"], "model.hidden_size=128 must be a multiple of model.num_heads=3"),
    ],
)
def test_recipe_mistakes_give_one_line_and_exit_status_2(tmp_path, capsys, argv, expected):
    assert expected in _refused(capsys, tmp_path, *argv)


def test_resume_followed_by_an_override_keeps_the_override(tmp_path):
    """``--resume run.max_steps=200``: argparse hands the token to --resume's optional value; it is the override."""
    args = train.parse_args(["demo", "run.batch_size=4", "--resume", "run.max_steps=200"])
    assert args.resume is True and args.overrides == ["run.batch_size=4", "run.max_steps=200"]
    checkpoint = tmp_path / "checkpoint-8"
    checkpoint.mkdir()
    args = train.parse_args(["demo", "--resume", str(checkpoint)])
    assert args.resume == str(checkpoint) and args.overrides == []
    args = train.parse_args(["demo", "--resume"])
    assert args.resume is True


@pytest.mark.parametrize(
    "argv, output_dir",
    [
        (["demo", "--output-dir", "out", "a.b=1", "c.d=2"], "out"),
        (["--output-dir", "out", "demo", "a.b=1", "--threads", "1", "c.d=2"], "out"),
        (["demo", "a.b=1", "--resume", "c.d=2"], None),
    ],
)
def test_overrides_may_follow_options(argv, output_dir):
    args = train.parse_args(argv)
    assert (args.recipe, args.overrides, args.output_dir) == ("demo", ["a.b=1", "c.d=2"], output_dir)


@pytest.mark.parametrize("value", ["no/such/checkpoint-8", "model=3"])
def test_resume_from_a_missing_checkpoint_is_refused_at_parsing(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exit_:
        train.parse_args(["demo", "--resume", value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"--resume {value!r}: no such checkpoint directory" in err


def test_resume_without_a_checkpoint_is_one_line_before_any_work(tmp_path, capsys):
    message = _refused(capsys, tmp_path, "demo", "--resume")
    assert "--resume: no checkpoint-N directory in the output dir" in message and str(tmp_path / "out") in message


def test_console_script_prints_no_traceback(tmp_path):
    """The installed ``hf-optim`` entry point, as a user runs it: status 2 and one line, no traceback."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    exe = shutil.which("hf-optim", path=str(Path(sys.executable).parent))
    assert exe, "hf-optim console script not installed next to the interpreter"
    result = subprocess.run(
        [exe, "train", "demo", "sizes.7B.lr=1e-3", "--output-dir", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("hf-optim train: override 'sizes.7B.lr=1e-3': unknown size"), last


@pytest.mark.parametrize("args, fallback", [({}, False), ({}, True), ({"factored": False}, False)])
def test_zero_caveat_is_enforced_when_the_trainer_builds_the_optimizer(tmp_path, args, fallback):
    """Under DeepSpeed ZeRO (``ACCELERATE_USE_DEEPSPEED``), RecipeTrainer refuses factored Adafactor, or falls back."""
    import warnings

    from transformers import LlamaForCausalLM, TrainingArguments

    from hf_optim.runner import schema
    from tests.conftest import tiny_llama_config

    overrides = [f"optimizer.args.factored={str(v).lower()}" for v in args.values()]
    recipe = schema.load("demo", [*overrides, f"run.unfactored_fallback={str(fallback).lower()}"])
    trainer = train._make_trainer_class()(
        model=LlamaForCausalLM(tiny_llama_config()),
        recipe=recipe,
        deepspeed=True,
        args=TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True),
    )
    if not args and not fallback:
        with pytest.raises(ValueError, match="Factored Adafactor cannot run under DeepSpeed ZeRO"):
            trainer.create_optimizer()
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimizer = trainer.create_optimizer()
    assert all(group["factored"] is False for group in optimizer.param_groups)
    assert any("falls back to an unfactored" in str(w.message) for w in caught) == fallback
    # The factored state (row/column statistics) must not appear: one second moment per parameter instead.
    model = trainer.model
    model(input_ids=torch.randint(0, 64, (2, 8)), labels=torch.randint(0, 64, (2, 8))).loss.backward()
    optimizer.step()
    weight = model.model.layers[0].self_attn.q_proj.weight
    assert optimizer.state[weight]["exp_avg_sq"].shape == weight.shape


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("base_width", [None, 16])
def test_build_model_from_config(arch, base_width):
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    from mup_integration.plan import has_plan

    cfg = {
        **_train_model.MODEL_DEFAULTS,
        "arch": arch,
        "hidden_size": 32,
        "num_layers": 1,
        "num_heads": 4,
        "mup": {"base_width": base_width} if base_width else None,
    }
    torch.manual_seed(0)
    model = _train_model.build_model(cfg, vocab_size=65, block_size=16)
    assert isinstance(model, {"llama": LlamaForCausalLM, "gpt2": GPT2LMHeadModel}[arch])
    assert has_plan(model) == bool(base_width)
    assert model.get_input_embeddings().weight.shape == (65, 32)
    ids = torch.randint(0, 65, (2, 16))
    loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss) and abs(loss.item() - math.log(65)) < 0.5  # near-uniform predictions at init
