"""``--optim_args`` fails when ``TrainingArguments`` is built: direct construction, HfArgumentParser, an unmodified
script in a fresh interpreter (which must stop before its first line after argument parsing)."""

from __future__ import annotations

import dataclasses
import subprocess
import types
from pathlib import Path

import pytest
import torch

import hf_optim
from hf_optim._optim_args import knob_kinds, parse_optim_args
from hf_optim.integrations.transformers import fail_fast as _fail_fast
from hf_optim.integrations.transformers.fail_fast import OptimArgsError

transformers = pytest.importorskip("transformers")
from transformers import HfArgumentParser, Trainer, TrainingArguments  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "parse_then_build.py"
BASE = {"report_to": [], "use_cpu": True, "disable_tqdm": True, "save_strategy": "no"}


def _args(tmp_path, **kw) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path), **{**BASE, **kw})


def _one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


# --- direct construction --------------------------------------------------------------------------------------------


def test_unknown_key_raises_at_construction_with_the_closest_key(tmp_path):
    with pytest.raises(OptimArgsError) as error:
        _args(tmp_path, optim="adamw_v2", optim_args="betta1=0.9")
    text = _one_line(error)
    assert text.startswith("--optim_args 'betta1=0.9' for --optim adamw_v2:")
    assert "Unknown optim_args key 'betta1'" in text and "Did you mean 'betas'?" in text
    # Adafactor has a knob called beta1: the suggestion follows the optimizer.
    with pytest.raises(OptimArgsError, match=r"Did you mean 'beta1'\?"):
        _args(tmp_path, optim="adafactor_v2", optim_args="betta1=0.9")


@pytest.mark.parametrize(
    "optim, optim_args, match",
    [
        # a name where a number is expected (the TypeError of issue 14, now with the key and what it takes)
        ("adafactor_v2", "beta1=abc", r"beta1='abc': beta1 must be a float or none, not a name \('abc'\)"),
        ("adamw_v2", "eps=small", r"eps must be a float, not a name"),
        ("adamw_v2", "betas=0.9:abc", r"betas must be ':'-separated numbers"),
        ("adafactor_v2", "min_dim_size_to_factor=1.5", r"min_dim_size_to_factor must be an integer, not a float"),
        ("adamw_v2", "eps_mode=1", r"eps_mode must be a name, not an integer"),
        ("sgdw_v2", "momentum=true", r"momentum must be a float, not true/false"),
        # the optimizer's own range and choice checks run too
        ("adafactor_v2", "beta1=1.5", r"beta1 must be in \[0, 1\), got 1.5"),
        ("adamw_v2", "weight_decay_mode=decoupled", r"weight_decay_mode must be one of"),
        ("adamw_v2", "betas=0.9:1.0", r"betas\[1\] must be in \[0, 1\)"),
        # syntax, reserved keys and the handler's own keys
        ("adamw_v2", "eps_mode=tf,", r"has an empty item"),
        ("adamw_v2", "lr=0.1", r"set lr with --learning_rate"),
        ("adamw_v2", "mup_wd_rule=sometimes", r"mup_wd_rule must be one of"),
    ],
)
def test_bad_values_raise_at_construction(tmp_path, optim, optim_args, match):
    with pytest.raises(OptimArgsError, match=match) as error:
        _args(tmp_path, optim=optim, optim_args=optim_args)
    assert _one_line(error).startswith(f"--optim_args {optim_args!r} for --optim {optim}:")
    assert isinstance(error.value, ValueError)  # what HfArgumentParser users and existing handlers expect


_ODD_INPUTS = [
    "=",
    "a=",
    "=1",
    ":",
    "betas=:",
    "betas=0.9::0.9",
    "eps=1e309",
    "eps=nan",
    "béta=1",
    "preset=nosuch",
    "betas=0.9:0.95:0.99",
    "implementation=compiled",
    "betas=true:false",
    "eps=0x10",
    "beta1=inf",
    "min_dim_size_to_factor=-3",
    "momentum_dtype=float64",
    "factor_dims=none",
    "mup_wd_rule=",
    "weight_decay_mode=",
    "betas=0.9:nan",
    "eps=" + "9" * 400,
    "decay_rate=1e-400",
    ",",
    "\t",
    "eps_mode=tf\n",
    "clip_threshold=" + "9" * 400,
]


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("optim", ["adamw_v2", "adafactor_v2", "sgdw_v2"])
def test_odd_input_is_accepted_or_refused_with_our_error_never_a_crash(tmp_path, optim):
    refused = 0
    for optim_args in _ODD_INPUTS:
        try:
            _args(tmp_path, optim=optim, optim_args=optim_args)
        except OptimArgsError as error:
            assert "\n" not in str(error) and str(error).startswith(f"--optim_args {optim_args!r}"), optim_args
            refused += 1
    assert refused >= len(_ODD_INPUTS) - 3  # only a few are valid for some optimizer (implementation=compiled, ...)


def test_repeated_keys_overflow_and_non_strings_are_refused(tmp_path):
    with pytest.raises(OptimArgsError, match=r"optim_args gives eps twice \(eps=1 and eps=2\): give it once"):
        _args(tmp_path, optim="adamw_v2", optim_args="eps=1,eps=2")
    _args(tmp_path, optim="adamw_v2", optim_args="eps=1,eps=1")  # nothing lost: accepted
    with pytest.raises(OptimArgsError, match=r"eps is too large for a float"):
        _args(tmp_path, optim="adamw_v2", optim_args="eps=1" + "0" * 400)
    with pytest.raises(OptimArgsError, match=r"optim_args must be a 'key=value,...' string, got int"):
        _fail_fast.check_optim_args("adamw_v2", 3)
    _fail_fast.check_optim_args("adamw_v2", {"eps": 1e-6})  # an already split mapping (programmatic use) is checked
    with pytest.raises(OptimArgsError, match=r"--optim_args 'eps=-1.0' for --optim adamw_v2: eps must be >= 0"):
        _fail_fast.check_optim_args("adamw_v2", {"eps": -1.0})


def test_none_is_left_to_the_optimizer(tmp_path):
    # clip_threshold=none (no clipping) is valid although every preset sets a number; momentum=none is not
    args = _args(tmp_path, optim="adafactor_v2", optim_args="clip_threshold=none,beta1=none")
    _, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    assert kwargs["clip_threshold"] is None and kwargs["beta1"] is None
    with pytest.raises(OptimArgsError, match=r"momentum must be a real number, got None"):
        _args(tmp_path, optim="sgdw_v2", optim_args="momentum=none")


def test_valid_args_construct_and_reach_the_optimizer(tmp_path):
    args = _args(tmp_path, optim="adafactor_v2", optim_args="beta1=0.8,momentum_dtype=float32,preset=palm")
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    group = cls([torch.nn.Parameter(torch.zeros(4, 3))], **kwargs).param_groups[0]
    assert cls is hf_optim.Adafactor and group["beta1"] == 0.8 and group["momentum_dtype"] == "float32"
    assert _args(tmp_path, optim="adamw_v2").optim_args is None  # no optim_args: nothing to check


def test_transformers_names_are_untouched(tmp_path):
    # transformers' own optimizers keep transformers' own (late) handling of optim_args
    args = _args(tmp_path, optim="adamw_torch", optim_args="betta1=0.9")
    assert args.optim_args == "betta1=0.9"
    # an unknown --optim is still transformers' error, not ours
    with pytest.raises(ValueError) as error:
        _args(tmp_path, optim="adamw_v3", optim_args="betta1=0.9")
    assert not isinstance(error.value, OptimArgsError)


def test_parser_replace_and_subclasses_are_checked(tmp_path):
    parser = HfArgumentParser((TrainingArguments,))
    argv = ["--output_dir", str(tmp_path), "--optim", "adamw_v2", "--optim_args", "beta1=0.9", "--use_cpu"]
    with pytest.raises(OptimArgsError, match="Unknown optim_args key 'beta1'"):
        parser.parse_args_into_dataclasses(args=argv)
    good = _args(tmp_path, optim="adamw_v2", optim_args="eps_mode=tf")
    with pytest.raises(OptimArgsError, match="eps_mode must be a name"):
        dataclasses.replace(good, optim_args="eps_mode=2")
    from transformers import Seq2SeqTrainingArguments

    with pytest.raises(OptimArgsError, match="Unknown optim_args key 'momentun'"):
        Seq2SeqTrainingArguments(output_dir=str(tmp_path), optim="sgdw_v2", optim_args="momentun=0.9", **BASE)


# --- the hook itself ------------------------------------------------------------------------------------------------


def test_install_is_idempotent_and_harmless_when_internals_differ():
    from transformers import training_args

    wrapper = TrainingArguments.__dict__["__post_init__"]
    assert wrapper.hf_optim_wrapped
    assert _fail_fast.install(training_args) and _fail_fast.install(training_args)
    assert TrainingArguments.__dict__["__post_init__"] is wrapper  # not wrapped twice
    assert not getattr(wrapper.__wrapped__, "hf_optim_wrapped", False)
    # a transformers without the class, or without a __post_init__ of its own, is left alone
    assert not _fail_fast.install(types.ModuleType("empty"))
    bare = types.ModuleType("bare")
    bare.TrainingArguments = type("TrainingArguments", (), {})
    assert not _fail_fast.install(bare) and "__post_init__" not in bare.TrainingArguments.__dict__


def test_knob_kinds_come_from_annotations_defaults_and_presets():
    assert knob_kinds(hf_optim.AdamW, "eps") == {float}
    assert knob_kinds(hf_optim.AdamW, "betas") == {tuple}
    assert knob_kinds(hf_optim.AdamW, "maximize") == {bool}
    assert knob_kinds(hf_optim.Adafactor, "beta1") == {float, type(None)}  # 0.9 in adafactor_v2, None in hf
    assert knob_kinds(hf_optim.Adafactor, "min_dim_size_to_factor") == {int}

    class Annotated(torch.optim.SGD):
        def __init__(
            self, params, lr: float = 0.1, *, clip: float | None = None, mode="a", steps: int = 1, momentum=0
        ) -> None:
            super().__init__(params, lr=lr)

    assert knob_kinds(Annotated, "clip") == {float, type(None)}  # from the annotation alone
    assert knob_kinds(Annotated, "mode") == {str}  # from the default alone
    assert knob_kinds(Annotated, "steps") == {int}  # annotated int
    assert knob_kinds(Annotated, "momentum") == {int, float}  # an unannotated 0 is a number, not an integer
    with pytest.raises(ValueError, match=r"clip must be a float or none, not a name"):
        parse_optim_args("clip=off", Annotated, optim_name="annotated")
    assert parse_optim_args("clip=1,momentum=0.9", Annotated, optim_name="annotated")[0] == {"clip": 1, "momentum": 0.9}
    with pytest.raises(ValueError, match=r"steps must be an integer, not a float \(2.5\)"):
        parse_optim_args("steps=2.5", Annotated, optim_name="annotated")


# --- an unmodified script in a fresh interpreter --------------------------------------------------------------------


def _run_script(tmp_path: Path, optim: str, optim_args: str) -> subprocess.CompletedProcess[str]:
    from test_autoload import _env, _python  # the same .pth set-up as the other fresh-interpreter tests

    argv = [
        str(SCRIPT),
        "--output_dir",
        str(tmp_path / "out"),
        "--optim",
        optim,
        "--optim_args",
        optim_args,
        "--use_cpu",
        "--report_to",
        "none",
    ]
    return subprocess.run(
        [*_python(tmp_path), *argv], env=_env(), capture_output=True, text=True, timeout=300, check=False
    )


@pytest.mark.parametrize(
    "optim, optim_args, error_line",
    [
        (
            "adamw_v2",
            "betta1=0.9",
            (
                "hf_optim.integrations.transformers.fail_fast.OptimArgsError: --optim_args 'betta1=0.9' for --optim adamw_v2: Unknown optim_args "
                "key 'betta1'"
            ),
        ),
        (
            "adafactor_v2",
            "beta1=abc",
            (
                "hf_optim.integrations.transformers.fail_fast.OptimArgsError: --optim_args 'beta1=abc' for --optim adafactor_v2: optim_args "
                "beta1='abc': beta1 must be a float or none"
            ),
        ),
    ],
)
def test_unmodified_script_stops_before_its_next_line(tmp_path, optim, optim_args, error_line):
    result = _run_script(tmp_path, optim, optim_args)
    assert result.returncode != 0
    assert "ARGUMENTS-PARSED" not in result.stdout and "MODEL-BUILT" not in result.stdout
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith(error_line), result.stderr[-2000:]


def test_unmodified_script_with_good_optim_args_goes_on(tmp_path):
    result = _run_script(tmp_path, "adafactor_v2", "beta1=0.8,momentum_dtype=float32")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ARGUMENTS-PARSED beta1=0.8,momentum_dtype=float32" in result.stdout and "MODEL-BUILT" in result.stdout
