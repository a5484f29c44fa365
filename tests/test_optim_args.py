"""``--optim_args``: value spellings, typing against the optimizer's signature, every knob reachable, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import hf_optim
from hf_optim import registry
from hf_optim._optim_args import knob_defaults, parse_optim_args, parse_value

transformers = pytest.importorskip("transformers")
from transformers import Trainer, TrainingArguments  # noqa: E402

NAMES = ["adafactor_v2", "adamw_v2", "adam_v2", "radam_v2", "sgdw_v2", "adagrad_v2", "rmsprop_v2", "adam_atan2"]


def _args(tmp_path, **kw) -> TrainingArguments:
    base = dict(output_dir=str(tmp_path), report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no")
    return TrainingArguments(**{**base, **kw})


# --- optim_args -----------------------------------------------------------------------------------------------------


def test_parse_value_spellings():
    assert parse_value("true") is True and parse_value("False") is False
    assert parse_value("none") is None and parse_value("null") is None
    assert parse_value("3") == 3 and isinstance(parse_value("3"), int)
    assert parse_value("1e-7") == 1e-7 and parse_value("-0.5") == -0.5 and parse_value(".5") == 0.5
    assert parse_value("0.9:0.95") == (0.9, 0.95)
    assert parse_value("independent") == "independent" and parse_value("for-loop") == "for-loop"


def test_optim_args_are_typed_against_the_class():
    kwargs, options = parse_optim_args(
        {"betas": "0:0.95", "eps": "1", "eps_mode": "tf", "maximize": "yes", "weight_decay_mode": "independent"},
        hf_optim.AdamW,
        optim_name="adamw_v2",
    )
    assert kwargs == {
        "betas": (0.0, 0.95),
        "eps": 1.0,
        "eps_mode": "tf",
        "maximize": True,
        "weight_decay_mode": "independent",
    }
    assert isinstance(kwargs["eps"], float) and all(isinstance(b, float) for b in kwargs["betas"])
    assert options == {"mup": None, "mup_wd_rule": "independent", "groups": None, "layer_decay": None}


def test_adafactor_knobs_come_from_presets():
    kwargs, _ = parse_optim_args(
        "beta1=none,min_dim_size_to_factor=2,clip_threshold=2,preset=palm",
        hf_optim.Adafactor,
        optim_name="adafactor_v2",
        preset="adafactor_v2",
    )
    assert kwargs == {"beta1": None, "min_dim_size_to_factor": 2, "clip_threshold": 2.0, "preset": "palm"}
    assert isinstance(kwargs["clip_threshold"], float) and isinstance(kwargs["min_dim_size_to_factor"], int)


# A valid non-default spelling for every string knob; numbers and flags are derived from the default.
_OTHER_STRING = {
    "weight_decay_mode": {"independent": "coupled"},
    "eps_mode": {"torch": "tf", "tf": "torch"},
    "implementation": {"auto": "for-loop"},
    "preset": {"adafactor_v2": "palm"},
    "factor_dims": {"largest_two": "last_two"},
    "momentum_dtype": {"bfloat16": "float32"},
    "eps1_mode": {"add": "clamp"},
    "relative_step_lr": {"multiplier": "cap"},
    "weight_decay_lr": {"group": "step"},
    "state_dtype": {"float32": "int8"},
    "param_update": {"nearest": "kahan"},
}
# Knobs that are only valid together with another one.
# (eps1_mode=clamp bounds V by eps1², which for adafactor_v2's eps1=1e-30 underflows in fp32 and is refused.)
_COMPANION = {"nesterov": "momentum=0.9", "warmup_init": "relative_step=true", "eps1_mode": "eps1=1e-10"}


def _non_default(knob, default):
    """(text for --optim_args, the value the optimizer group must then hold)."""
    if isinstance(default, bool):
        return str(not default).lower(), not default
    if isinstance(default, int):
        return str(2 * default), 2 * default
    if isinstance(default, float):
        value = default / 2 if default else 0.125
        return repr(value), value
    if isinstance(default, tuple):
        value = tuple(x / 2 for x in default)
        return ":".join(map(repr, value)), value
    if isinstance(default, str):
        other = _OTHER_STRING[knob].get(default, "independent" if knob == "weight_decay_mode" else None)
        return other, other
    raise AssertionError(f"no non-default spelling for {knob}={default!r}")


def _knob_cases():
    for spec in registry.list_optimizers():
        if spec.name not in NAMES:
            continue
        for knob, default in knob_defaults(spec.resolve(), spec.defaults.get("preset")).items():
            if knob not in ("lr", "weight_decay") and default is not None:
                yield spec.name, knob, default


@pytest.mark.filterwarnings("ignore:Adafactor relative_step")
@pytest.mark.parametrize("name, knob, default", list(_knob_cases()))
def test_every_knob_is_reachable_through_optim_args(tmp_path, name, knob, default):
    text, value = _non_default(knob, default)
    optim_args = ",".join(filter(None, [f"{knob}={text}", _COMPANION.get(knob)]))
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(_args(tmp_path, optim=name, optim_args=optim_args))
    assert kwargs[knob] == value and type(kwargs[knob]) is type(value)
    optimizer = cls([torch.nn.Parameter(torch.zeros(4, 3))], **kwargs)
    if knob != "preset":  # a preset is expanded into the other knobs
        assert optimizer.param_groups[0][knob] == value


def test_docs_list_every_knob_with_its_default():
    # docs/trainer.md is the user's reference for --optim_args: it must not miss or misstate a knob
    text = (Path(__file__).resolve().parents[1] / "docs" / "trainer.md").read_text()
    spell = {True: "true", False: "false", None: "none"}
    for spec in registry.list_optimizers():
        if spec.name not in NAMES:
            continue
        (row,) = [
            line for line in text.splitlines() if line.startswith(f"| `{spec.name}` | `") and "`implementation=" in line
        ]
        for knob, default in knob_defaults(spec.resolve(), spec.defaults.get("preset")).items():
            if knob in ("lr", "weight_decay"):
                continue
            if isinstance(default, tuple):
                value = ":".join(map(str, default))
            elif isinstance(default, (bool, type(None))):
                value = spell[default]
            else:
                value = default
            assert f"`{knob}={value}`" in row, (spec.name, knob)


def test_adafactor_preset_values_reach_the_groups(tmp_path):
    # 'palm' changes the defaults of the knobs not given; an explicit knob still wins over the preset
    from hf_optim.optim.adafactor.presets import PRESETS

    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(
        _args(tmp_path, optim="adafactor_v2", optim_args="preset=palm,beta1=0.5")
    )
    group = cls([torch.nn.Parameter(torch.zeros(4, 3))], **kwargs).param_groups[0]
    assert group["beta1"] == 0.5
    for knob, value in PRESETS["palm"].items():
        if knob not in ("beta1", "lr", "weight_decay"):
            assert group[knob] == value, knob


@pytest.mark.parametrize(
    "optim_args, match",
    [
        (
            "weight_decay_moed=independent",
            r"Unknown optim_args key 'weight_decay_moed'.*Valid keys: \[.*"
            r"'weight_decay_mode'.*Did you mean 'weight_decay_mode'\?",
        ),
        ("lr=0.1", r"set lr with --learning_rate"),
        ("weight_decay=0.1", r"set weight_decay with --weight_decay"),
        ("maximize=maybe", r"maximize is a flag"),
        ("betas=0.9", r"betas takes 2 values; separate them with ':'"),
        ("mup_wd_rule=sometimes", r"mup_wd_rule must be one of"),
        ("eps", r"must look like key=value"),
    ],
)
def test_bad_optim_args_raise_our_error(optim_args, match):
    with pytest.raises(ValueError, match=match):
        parse_optim_args(optim_args, hf_optim.AdamW, optim_name="adamw_v2")


def test_bad_optim_args_through_the_trainer(tmp_path):
    # Building TrainingArguments already refuses this (tests/test_fail_fast.py); set after construction, the
    # Trainer's own path must still give the same error.
    args = _args(tmp_path, optim="sgdw_v2")
    args.optim_args = "momentun=0.9"
    with pytest.raises(ValueError, match=r"Unknown optim_args key 'momentun'.*Did you mean 'momentum'\?"):
        Trainer.get_optimizer_cls_and_kwargs(args)


@pytest.mark.parametrize("bad", ["eps", "eps_mode=tf,", "eps_mode=tf,,maximize=true", "betas=0.9=0.95"])
def test_malformed_optim_args_through_the_trainer(tmp_path, bad):
    # transformers splits optim_args before any handler runs; for our names the string is checked first
    with pytest.raises(ValueError, match=r"optim_args .* (must look like key=value|has an empty item)"):
        Trainer.get_optimizer_cls_and_kwargs(_args(tmp_path, optim="adamw_v2", optim_args=bad))
    # transformers' own names keep transformers' own behaviour (its bare unpacking error)
    with pytest.raises(ValueError, match="values to unpack"):
        Trainer.get_optimizer_cls_and_kwargs(_args(tmp_path, optim="adamw_torch", optim_args=bad))
