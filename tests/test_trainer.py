"""Trainer plugin: enum registration, optim_args parsing, TrainingArguments mapping, muP wiring, logging, guard."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

import hf_optim
from hf_optim import registry
from hf_optim import trainer as plugin
from hf_optim._optim_args import parse_optim_args, parse_value

from conftest import tiny_llama_config

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from train_tiny_clm import RuleDataset  # noqa: E402

transformers = pytest.importorskip("transformers")
from transformers import LlamaForCausalLM, Trainer, TrainingArguments  # noqa: E402
from transformers.training_args import OptimizerNames  # noqa: E402
from transformers.trainer_optimizer import _OPTIMIZER_HANDLERS  # noqa: E402

NAMES = ["adafactor_v2", "adamw_v2", "adam_v2", "radam_v2", "sgdw_v2", "adagrad_v2", "rmsprop_v2", "adam_atan2"]


def _args(tmp_path, **kw) -> TrainingArguments:
    base = dict(output_dir=str(tmp_path), report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no")
    return TrainingArguments(**{**base, **kw})


# --- registration ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_names_are_real_enum_members(name):
    member = OptimizerNames(name)
    assert member.value == name and isinstance(member, str) and member == name
    assert OptimizerNames[member.name] is member
    assert getattr(OptimizerNames, member.name) is member
    assert member.name in OptimizerNames._member_names_
    assert OptimizerNames._value2member_map_[name] is member
    assert member in list(OptimizerNames)
    assert _OPTIMIZER_HANDLERS[member].hf_optim_spec == name
    import pickle

    assert pickle.loads(pickle.dumps(member)) is member


def test_registration_is_idempotent():
    before = (list(OptimizerNames._member_names_), dict(_OPTIMIZER_HANDLERS))
    plugin.register_all()
    plugin.register_all()
    from hf_optim import _autoload

    _autoload.install()
    assert list(OptimizerNames._member_names_) == before[0]
    assert dict(_OPTIMIZER_HANDLERS) == before[1]
    assert sum(f is _autoload.FINDER for f in sys.meta_path) == 1


def test_third_party_register_optimizer_becomes_an_optim_name(tmp_path):
    spec = hf_optim.OptimizerSpec("adamw_v2_thirdparty_test", "hf_optim.adam:AdamW", "test-only alias")
    try:
        hf_optim.register_optimizer(spec)
        args = _args(tmp_path, optim="adamw_v2_thirdparty_test")
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
        assert cls is hf_optim.AdamW and kwargs["lr"] == args.learning_rate
    finally:
        registry._REGISTRY.pop(spec.name, None)


def test_training_arguments_round_trip(tmp_path):
    args = _args(tmp_path, optim="adafactor_v2", optim_args="beta1=0.95,momentum_dtype=float32")
    assert args.optim is OptimizerNames("adafactor_v2")
    data = json.loads(args.to_json_string())
    assert data["optim"] == "adafactor_v2" and data["optim_args"] == "beta1=0.95,momentum_dtype=float32"
    again = TrainingArguments(**{k: v for k, v in data.items() if k in {"output_dir", "optim", "optim_args"}})
    assert again.optim is args.optim


def test_unknown_optim_name_lists_ours(tmp_path):
    with pytest.raises(ValueError) as info:
        _args(tmp_path, optim="adafactor_v3")
    for name in NAMES:
        assert f"'{name}'" in str(info.value)


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
        hf_optim.AdamW, optim_name="adamw_v2",
    )
    assert kwargs == {"betas": (0.0, 0.95), "eps": 1.0, "eps_mode": "tf", "maximize": True,
                      "weight_decay_mode": "independent"}
    assert isinstance(kwargs["eps"], float) and all(isinstance(b, float) for b in kwargs["betas"])
    assert options == {"mup": None, "mup_wd_rule": "independent"}


def test_adafactor_knobs_come_from_presets():
    kwargs, _ = parse_optim_args("beta1=none,min_dim_size_to_factor=2,clip_threshold=2,preset=palm",
                                 hf_optim.Adafactor, optim_name="adafactor_v2", preset="adafactor_v2")
    assert kwargs == {"beta1": None, "min_dim_size_to_factor": 2, "clip_threshold": 2.0, "preset": "palm"}
    assert isinstance(kwargs["clip_threshold"], float) and isinstance(kwargs["min_dim_size_to_factor"], int)


@pytest.mark.parametrize(
    "optim_args, match",
    [
        ("weight_decay_moed=independent", r"Unknown optim_args key 'weight_decay_moed'.*Valid keys: \[.*"
                                          r"'weight_decay_mode'.*Did you mean 'weight_decay_mode'\?"),
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
    args = _args(tmp_path, optim="sgdw_v2", optim_args="momentun=0.9")
    with pytest.raises(ValueError, match=r"Unknown optim_args key 'momentun'.*Did you mean 'momentum'\?"):
        Trainer.get_optimizer_cls_and_kwargs(args)


# --- handler: TrainingArguments mapping and the Trainer's groups ---------------------------------------------------


def test_training_arguments_map_to_kwargs(tmp_path):
    args = _args(tmp_path, optim="adamw_v2", learning_rate=3e-3, weight_decay=0.05, adam_beta1=0.8,
                 adam_beta2=0.95, adam_epsilon=1e-6, optim_args="eps_mode=tf")
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    assert cls is hf_optim.AdamW
    assert kwargs == {"lr": 3e-3, "weight_decay": 0.05, "betas": (0.8, 0.95), "eps": 1e-6, "eps_mode": "tf"}
    # optim_args win over the mapped TrainingArguments
    _, kwargs = Trainer.get_optimizer_cls_and_kwargs(_args(tmp_path, optim="adam_v2", optim_args="betas=0.5:0.6"))
    assert kwargs["betas"] == (0.5, 0.6)
    # AdamAtan2 has no epsilon; SGD-likes take no Adam arguments; Adafactor keeps its preset
    _, kwargs = Trainer.get_optimizer_cls_and_kwargs(_args(tmp_path, optim="adam_atan2"))
    assert "eps" not in kwargs and kwargs["betas"] == (0.9, 0.999)
    _, kwargs = Trainer.get_optimizer_cls_and_kwargs(_args(tmp_path, optim="sgdw_v2", optim_args="momentum=0.9"))
    assert kwargs == {"lr": 5e-5, "weight_decay": 0.0, "momentum": 0.9}
    _, kwargs = Trainer.get_optimizer_cls_and_kwargs(_args(tmp_path, optim="adafactor_v2"))
    assert kwargs == {"preset": "adafactor_v2", "lr": 5e-5, "weight_decay": 0.0}


def test_trainer_keeps_decay_groups_and_builds_a_real_optimizer(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    args = _args(tmp_path, optim="adamw_v2", weight_decay=0.1, optim_args="weight_decay_mode=corrected")
    trainer = Trainer(model=model, args=args, train_dataset=RuleDataset(8, 16, 64))
    optimizer = trainer.create_optimizer()
    assert type(optimizer) is hf_optim.AdamW and isinstance(optimizer, torch.optim.Optimizer)
    decay_names = set(trainer.get_decay_parameter_names(model))
    by_id = {id(p): n for n, p in model.named_parameters()}
    assert len(optimizer.param_groups) == 2
    for group, wd in zip(optimizer.param_groups, (0.1, 0.0)):
        assert group["weight_decay"] == wd and group["weight_decay_mode"] == "corrected"
        names = {by_id[id(p)] for p in group["params"]}
        assert names <= decay_names if wd else not names & decay_names


# --- muP wiring -----------------------------------------------------------------------------------------------------


def test_mup_plan_adds_param_overrides(tmp_path, monkeypatch):
    import mup_integration.groups as groups

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    model.config.mup = {"fake": "plan"}
    calls = []
    hidden = model.model.layers[0].mlp.up_proj.weight

    def fake_param_overrides(m, family="adam", wd_rule="independent", **kw):
        calls.append((m, family, wd_rule))
        return {hidden: {"lr_mult": 0.25}}

    monkeypatch.setattr(groups, "param_overrides", fake_param_overrides)
    args = _args(tmp_path, optim="sgdw_v2", learning_rate=0.1, optim_args="mup_wd_rule=mup")
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    assert calls == [(model, "sgd", "mup")] and kwargs["param_overrides"] == {hidden: {"lr_mult": 0.25}}
    optimizer = Trainer(model=model, args=_args(tmp_path, optim="adamw_v2", learning_rate=0.1)).create_optimizer()
    assert calls[-1] == (model, "adam", "independent")
    lrs = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert lrs[id(hidden)] == pytest.approx(0.025) and lrs[id(model.lm_head.weight)] == 0.1
    # opt-out, and an explicit mup=true without a plan is an error
    _, kwargs = Trainer.get_optimizer_cls_and_kwargs(_args(tmp_path, optim="adamw_v2", optim_args="mup=false"), model)
    assert "param_overrides" not in kwargs
    model.config.mup = None
    with pytest.raises(ValueError, match="model.config.mup is not set"):
        Trainer.get_optimizer_cls_and_kwargs(_args(tmp_path, optim="adamw_v2", optim_args="mup=true"), model)


# --- training with every name, and the logs -------------------------------------------------------------------------

_LR = {"sgdw_v2": 0.3, "adagrad_v2": 3e-2, "rmsprop_v2": 3e-3, "radam_v2": 5e-2}
_EXTRA = {"sgdw_v2": "momentum=0.9"}


@pytest.mark.parametrize("name", NAMES)
def test_tiny_llama_trains_30_steps(tmp_path, name):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    args = _args(tmp_path, optim=name, optim_args=_EXTRA.get(name), learning_rate=_LR.get(name, 1e-2), max_steps=30,
                 per_device_train_batch_size=8, logging_steps=10, weight_decay=1e-4, lr_scheduler_type="linear")
    trainer = Trainer(model=model, args=args, train_dataset=RuleDataset(240, 16, 64))
    trainer.train()
    assert type(trainer.optimizer.optimizer) is registry.get_spec(name).resolve()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3 and logs[-1]["loss"] < 0.9 * logs[0]["loss"], logs  # RAdam rectifies slowly (beta2=0.999)
    # Per-group lr / weight decay are in the logs, and equal the optimizer's groups at the last log.
    groups = trainer.optimizer.optimizer.param_groups
    for i, group in enumerate(groups):
        assert logs[-1][f"lr/group_{i}"] == group["lr"]
        assert logs[-1][f"wd/group_{i}"] == group["weight_decay"]
    assert logs[0]["wd/group_0"] == 1e-4 and logs[0]["wd/group_1"] == 0.0


def test_logged_decay_is_the_per_step_fraction(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    args = _args(tmp_path, optim="adamw_v2", optim_args="weight_decay_mode=independent", learning_rate=1e-2,
                 weight_decay=1e-4, max_steps=4, logging_steps=2, per_device_train_batch_size=4,
                 lr_scheduler_type="linear")
    trainer = Trainer(model=model, args=args, train_dataset=RuleDataset(16, 16, 64))
    trainer.train()
    log = [h for h in trainer.state.log_history if "loss" in h][0]
    # after 2 of 4 linear-decay steps the group lr is 1e-2 * 2/4; independent decay removes (lr_t/lr_peak)·λ
    assert log["lr/group_0"] == pytest.approx(5e-3)
    assert log["decay/group_0"] == pytest.approx(0.5 * 1e-4, rel=1e-12)
    assert log["decay/group_1"] == 0.0


# --- version guard and fallback -------------------------------------------------------------------------------------


def test_guard_names_versions_and_fallback(monkeypatch):
    import transformers.trainer_optimizer as trainer_optimizer

    monkeypatch.delattr(trainer_optimizer, "_OPTIMIZER_HANDLERS")
    with pytest.raises(plugin.TransformersIncompatibleError) as info:
        plugin.register_all()
    message = str(info.value)
    assert "_OPTIMIZER_HANDLERS" in message and "Supported: transformers >=" in message
    assert "optimizer_cls_and_kwargs" in message
    # the hook path warns instead of breaking `import transformers`
    with pytest.warns(RuntimeWarning, match="not registered"):
        plugin.on_module_loaded(trainer_optimizer)


def test_guard_rejects_a_changed_enum(monkeypatch):
    import enum
    import types

    fake = types.ModuleType("transformers.training_args")
    fake.OptimizerNames = enum.Enum("OptimizerNames", {"A": "a"})  # not a str enum
    with pytest.raises(plugin.TransformersIncompatibleError, match="not a str Enum"):
        plugin.check_training_args(fake)


def test_fallback_optimizer_cls_and_kwargs(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    args = _args(tmp_path, max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2, weight_decay=0.1)
    cls_kwargs = plugin.optimizer_cls_and_kwargs("adafactor_v2", args, model, optim_args="beta1=0.8")
    assert cls_kwargs == (hf_optim.Adafactor, {"preset": "adafactor_v2", "lr": 1e-2, "weight_decay": 0.1,
                                               "beta1": 0.8})
    trainer = Trainer(model=model, args=args, train_dataset=RuleDataset(12, 16, 64), optimizer_cls_and_kwargs=cls_kwargs)
    trainer.train()
    optimizer = trainer.optimizer.optimizer
    assert type(optimizer) is hf_optim.Adafactor and [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    assert all(g["beta1"] == 0.8 for g in optimizer.param_groups)
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])
