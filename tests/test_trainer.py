"""Trainer plugin: enum registration, optim_args parsing, TrainingArguments mapping, muP wiring, logging, guard."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama_config

import hf_optim
from hf_optim import registry
from hf_optim.integrations.transformers import trainer as plugin
from hf_optim.integrations.transformers.group_logging import group_log_values

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from train_tiny_clm import RuleDataset

transformers = pytest.importorskip("transformers")
from transformers import LlamaForCausalLM, Trainer, TrainingArguments  # noqa: E402
from transformers.trainer_optimizer import _OPTIMIZER_HANDLERS  # noqa: E402
from transformers.training_args import OptimizerNames  # noqa: E402

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
    from hf_optim.integrations.transformers import autoload as _autoload

    _autoload.install()
    assert list(OptimizerNames._member_names_) == before[0]
    assert dict(_OPTIMIZER_HANDLERS) == before[1]
    assert sum(f is _autoload.FINDER for f in sys.meta_path) == 1


_THIRD_PARTY = """
import torch


class SignDescent(torch.optim.Optimizer):
    \"\"\"x <- x - lr * sign(g): a third-party optimizer that knows nothing about hf-optim.\"\"\"

    def __init__(self, params, lr=1e-3, weight_decay=0.0, flip=False):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, flip=flip))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign(), alpha=group["lr"] if group["flip"] else -group["lr"])
"""


def test_third_party_register_optimizer_works_end_to_end(tmp_path, monkeypatch, capsys):
    from transformers import HfArgumentParser

    (tmp_path / "third_party_opt.py").write_text(_THIRD_PARTY)
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = hf_optim.OptimizerSpec("sign_descent_test", "third_party_opt:SignDescent", "test-only", adam_args=False)
    try:
        hf_optim.register_optimizer(spec)
        assert hf_optim.register_optimizer(spec) is spec  # idempotent
        # a parser built now offers the name; TrainingArguments keep it through to_dict
        (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(
            [
                "--output_dir",
                str(tmp_path),
                "--optim",
                "sign_descent_test",
                "--learning_rate",
                "0.01",
                "--max_steps",
                "1",
                "--per_device_train_batch_size",
                "4",
                "--report_to",
                "none",
                "--use_cpu",
                "--save_strategy",
                "no",
                "--lr_scheduler_type",
                "constant",
                "--disable_tqdm",
                "true",
            ]
        )
        assert args.optim is OptimizerNames("sign_descent_test") and args.to_dict()["optim"] == "sign_descent_test"
        # optim_args are typed against the third-party signature, with our error for an unknown key
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(
            _args(tmp_path, optim="sign_descent_test", optim_args="flip=false")
        )
        assert cls.__module__ == "third_party_opt" and kwargs == {"lr": 5e-5, "weight_decay": 0.0, "flip": False}
        with pytest.raises(ValueError, match=r"Valid keys: \['flip'"):
            Trainer.get_optimizer_cls_and_kwargs(_args(tmp_path, optim="sign_descent_test", optim_args="flp=1"))
        # one Trainer step: every parameter with a non-zero gradient moves by exactly lr
        torch.manual_seed(0)
        model = LlamaForCausalLM(tiny_llama_config())
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        trainer = Trainer(model=model, args=args, train_dataset=RuleDataset(4, 16, 64))
        trainer.train()
        assert type(trainer.optimizer.optimizer).__name__ == "SignDescent"
        assert len(trainer.optimizer.optimizer.param_groups) == 2  # the Trainer's decay / no-decay groups
        moved = 0
        for name, p in model.named_parameters():
            step = (p.detach() - before[name]).abs().double()
            changed = step > 0
            moved += int(changed.sum())
            torch.testing.assert_close(step[changed], torch.full_like(step[changed], 0.01), rtol=0, atol=1e-6)
        assert moved > 0.9 * sum(p.numel() for p in model.parameters())
    finally:
        registry._REGISTRY.pop(spec.name, None)
        sys.modules.pop("third_party_opt", None)


def test_training_arguments_round_trip(tmp_path):
    args = _args(tmp_path, optim="adafactor_v2", optim_args="beta1=0.95,momentum_dtype=float32")
    assert args.optim is OptimizerNames("adafactor_v2")
    as_dict = args.to_dict()
    assert as_dict["optim"] == "adafactor_v2" and type(as_dict["optim"]) is str
    data = json.loads(args.to_json_string())
    assert data["optim"] == "adafactor_v2" and data["optim_args"] == "beta1=0.95,momentum_dtype=float32"
    # every init field back through the constructor (what `TrainingArguments(**json.load(f))` does)
    again = TrainingArguments(**data)
    assert again.optim is args.optim and again.optim_args == args.optim_args
    assert json.loads(again.to_json_string()) == data
    # training_args.bin is a pickle of the whole object: the enum member must come back as the same member
    import pickle

    assert pickle.loads(pickle.dumps(args)).optim is args.optim


def test_unknown_optim_name_lists_ours(tmp_path, capsys):
    with pytest.raises(ValueError) as info:
        _args(tmp_path, optim="adafactor_v3")
    for name in NAMES:
        assert f"'{name}'" in str(info.value)
    # the command line: argparse's "invalid choice" from HfArgumentParser, whose choices now include ours
    from transformers import HfArgumentParser

    parser = HfArgumentParser(TrainingArguments)
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--optim", "adafactor_v3"])
    err = capsys.readouterr().err
    assert "argument --optim: invalid choice: 'adafactor_v3'" in err
    assert "'adamw_torch'" in err and all(f"'{name}'" in err for name in NAMES)
    (parsed,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--optim", "adam_atan2"])
    assert parsed.optim is OptimizerNames("adam_atan2")


# --- handler: TrainingArguments mapping and the Trainer's groups ---------------------------------------------------


def test_training_arguments_map_to_kwargs(tmp_path):
    args = _args(
        tmp_path,
        optim="adamw_v2",
        learning_rate=3e-3,
        weight_decay=0.05,
        adam_beta1=0.8,
        adam_beta2=0.95,
        adam_epsilon=1e-6,
        optim_args="eps_mode=tf",
    )
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
    import mup_integration.policy as policy

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    model.config.hf_optim_mup = {"fake": "plan"}
    calls = []
    hidden = model.model.layers[0].mlp.up_proj.weight

    def fake_param_overrides(m, family="adam", wd_rule="independent", **kw):
        calls.append((m, family, wd_rule))
        return {hidden: {"lr_mult": 0.25}}

    monkeypatch.setattr(policy, "param_overrides", fake_param_overrides)
    monkeypatch.setattr(policy, "is_mup_applied", lambda m: True)  # the fake plan has no surgery
    monkeypatch.setattr(policy, "get_plan", lambda m: None)  # nor parameters: only the faked multipliers read it
    args = _args(tmp_path, optim="sgdw_v2", learning_rate=0.1, optim_args="mup_wd_rule=mup")
    _cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    assert calls == [(model, "sgd", "mup")] and kwargs["param_overrides"] == {hidden: {"lr_mult": 0.25}}
    optimizer = Trainer(model=model, args=_args(tmp_path, optim="adamw_v2", learning_rate=0.1)).create_optimizer()
    assert calls[-1] == (model, "adam", "independent")
    lrs = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert lrs[id(hidden)] == pytest.approx(0.025) and lrs[id(model.lm_head.weight)] == 0.1
    # opt-out, and an explicit mup=true without a plan is an error
    _, kwargs = Trainer.get_optimizer_cls_and_kwargs(_args(tmp_path, optim="adamw_v2", optim_args="mup=false"), model)
    assert "param_overrides" not in kwargs
    model.config.hf_optim_mup = None
    with pytest.raises(ValueError, match=r"model.config.hf_optim_mup is not set"):
        Trainer.get_optimizer_cls_and_kwargs(_args(tmp_path, optim="adamw_v2", optim_args="mup=true"), model)


def _mup_model(width=64, base_width=32):
    import mup_integration as mi

    torch.manual_seed(0)
    return mi.make_mup_model(tiny_llama_config(hidden_size=width), base_width=base_width)


def _lr_wd_by_param(optimizer, model):
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {
        by_id[id(p)]: (g["lr"], g["weight_decay"], g["weight_decay_mode"])
        for g in optimizer.param_groups
        for p in g["params"]
    }


def test_real_mup_model_gets_its_multipliers_and_mup_false_opts_out(tmp_path):
    # width 64 over base 32: width_mult m = 2. By hand (Tensor Programs V, Table 8, Adam rule): hidden matrices get
    # lr/m, embedding / readout / vectors keep lr; decayed tensors switch to width-independent decay; the Trainer's
    # no-decay group (norms, biases) keeps weight decay 0.
    model = _mup_model()
    assert model.config.hf_optim_mup["width_mult"] == 2.0
    lr, wd = 1e-2, 1e-4
    args = _args(
        tmp_path,
        optim="adamw_v2",
        learning_rate=lr,
        weight_decay=wd,
        max_steps=2,
        logging_steps=1,
        per_device_train_batch_size=4,
        lr_scheduler_type="constant",
    )
    trainer = Trainer(model=model, args=args, train_dataset=RuleDataset(8, 16, 64))
    groups = _lr_wd_by_param(trainer.create_optimizer(), model)
    hidden = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    for name, (group_lr, group_wd, mode) in groups.items():
        if name.endswith("norm.weight"):
            assert (group_lr, group_wd) == (lr, 0.0), name
        elif any(f"{h}.weight" in name for h in hidden):
            assert (group_lr, group_wd, mode) == (lr / 2, wd, "independent"), name
        else:
            assert name in ("model.embed_tokens.weight", "lm_head.weight"), name
            assert (group_lr, group_wd, mode) == (lr, wd, "independent"), name
    # the logs show each group's lr and its per-step decay fraction: lr_t/lr_peak·λ = λ at every width (constant lr)
    trainer.train()
    log = [h for h in trainer.state.log_history if "loss" in h][-1]
    optimizer = trainer.optimizer.optimizer
    for i, group in enumerate(optimizer.param_groups):
        assert log[f"lr/group_{i}"] == group["lr"] and log[f"wd/group_{i}"] == group["weight_decay"]
        assert log[f"decay/group_{i}"] == pytest.approx(group["weight_decay"], rel=1e-12)
    assert sorted({log[f"lr/group_{i}"] for i in range(len(optimizer.param_groups))}) == [lr / 2, lr]

    # SGD rule (mup.MuSGD): hidden lr / (fan_in_mult/fan_out_mult) = lr, embedding and readout lr·m
    groups = _lr_wd_by_param(
        Trainer(model=model, args=_args(tmp_path, optim="sgdw_v2", learning_rate=lr)).create_optimizer(), model
    )
    assert groups["model.layers.0.mlp.up_proj.weight"][0] == lr
    assert groups["model.embed_tokens.weight"][0] == groups["lm_head.weight"][0] == 2 * lr

    # opt out: the Trainer's two plain groups, one lr
    optimizer = Trainer(
        model=model, args=_args(tmp_path, optim="adamw_v2", learning_rate=lr, weight_decay=wd, optim_args="mup=false")
    ).create_optimizer()
    assert len(optimizer.param_groups) == 2
    assert {g["lr"] for g in optimizer.param_groups} == {lr}
    assert {g["weight_decay_mode"] for g in optimizer.param_groups} == {"coupled"}


# --- training with every name, and the logs -------------------------------------------------------------------------

_LR = {"sgdw_v2": 0.3, "adagrad_v2": 3e-2, "rmsprop_v2": 3e-3, "radam_v2": 5e-2}
_EXTRA = {"sgdw_v2": "momentum=0.9"}


@pytest.mark.parametrize("name", NAMES)
def test_tiny_llama_trains_30_steps(tmp_path, name):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    args = _args(
        tmp_path,
        optim=name,
        optim_args=_EXTRA.get(name),
        learning_rate=_LR.get(name, 1e-2),
        max_steps=30,
        per_device_train_batch_size=8,
        logging_steps=10,
        weight_decay=1e-4,
        lr_scheduler_type="linear",
    )
    trainer = Trainer(model=model, args=args, train_dataset=RuleDataset(240, 16, 64))
    trainer.train()
    assert type(trainer.optimizer.optimizer) is registry.get_spec(name).resolve()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3 and logs[-1]["loss"] < 0.9 * logs[0]["loss"], logs  # RAdam rectifies slowly (beta2=0.999)
    # Per-group lr / weight decay are in the logs: the lr of the logged step (the Trainer's own `learning_rate`,
    # read before the scheduler moves on) and the decay / no-decay groups' weight decay.
    assert len(trainer.optimizer.optimizer.param_groups) == 2
    for log in logs:
        assert log["lr/group_0"] == log["lr/group_1"] == log["learning_rate"]
        assert log["wd/group_0"] == 1e-4 and log["wd/group_1"] == 0.0
    # linear schedule, no warm-up: the lr used at step s (1-based) is lr·(1 - (s-1)/30)
    assert [log["lr/group_0"] for log in logs] == pytest.approx(
        [_LR.get(name, 1e-2) * (1 - s / 30) for s in (9, 19, 29)]
    )


def test_logged_decay_is_the_per_step_fraction(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    args = _args(
        tmp_path,
        optim="adamw_v2",
        optim_args="weight_decay_mode=independent",
        learning_rate=1e-2,
        weight_decay=1e-4,
        max_steps=4,
        logging_steps=2,
        per_device_train_batch_size=4,
        lr_scheduler_type="linear",
    )
    trainer = Trainer(model=model, args=args, train_dataset=RuleDataset(16, 16, 64))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    # linear decay over 4 steps: step 2 uses lr 1e-2·3/4, step 4 uses 1e-2·1/4; independent decay removes
    # (lr_t/lr_peak)·λ of each weight per step, whatever the peak lr
    assert [log["lr/group_0"] for log in logs] == pytest.approx([7.5e-3, 2.5e-3], rel=1e-12)
    assert [log["decay/group_0"] for log in logs] == pytest.approx([0.75e-4, 0.25e-4], rel=1e-12)
    assert all(log["decay/group_1"] == 0.0 and log["wd/group_1"] == 0.0 for log in logs)
    # l2 decay is a gradient term, not a per-step fraction: no decay/ key then
    assert group_log_values(hf_optim.Adam([torch.nn.Parameter(torch.ones(2))], weight_decay=0.1)) == {
        "lr/group_0": 1e-3,
        "wd/group_0": 0.1,
    }


# --- version guard and fallback -------------------------------------------------------------------------------------


def test_guard_names_versions_and_fallback(monkeypatch):
    import transformers.trainer_optimizer as trainer_optimizer

    monkeypatch.delattr(trainer_optimizer, "_OPTIMIZER_HANDLERS")
    with pytest.raises(plugin.TransformersIncompatibleError) as info:
        plugin.register_all()
    message = str(info.value)
    assert "_OPTIMIZER_HANDLERS" in message and "Supported: transformers >=" in message
    assert "optimizer_cls_and_kwargs" in message
    # no name is left behind without a handler: it would pass `--optim` parsing and fail in create_optimizer
    assert not set(NAMES) & set(OptimizerNames._value2member_map_)
    # the hook path warns instead of breaking `import transformers`, and also leaves no name behind
    with pytest.warns(RuntimeWarning, match="not registered"):
        plugin.on_module_loaded(trainer_optimizer)
    assert not set(NAMES) & set(OptimizerNames._value2member_map_)
    monkeypatch.undo()
    plugin.register_all()
    assert set(NAMES) <= set(OptimizerNames._value2member_map_)
    assert all(_OPTIMIZER_HANDLERS[OptimizerNames(n)].hf_optim_spec == n for n in NAMES)


def test_guard_rejects_transformers_without_a_handler_table(monkeypatch):
    # transformers < 5.2 has OptimizerNames but no trainer_optimizer module: registering the names there would
    # accept `--optim adafactor_v2` and fail later in create_optimizer, so registration refuses up front.
    import enum
    import types

    fake = types.ModuleType("transformers.training_args")
    fake.OptimizerNames = enum.Enum("OptimizerNames", {"ADAMW_TORCH": "adamw_torch"}, type=str)
    monkeypatch.setattr(plugin, "_module_exists", lambda name: name != "transformers.trainer_optimizer")
    with pytest.raises(
        plugin.TransformersIncompatibleError, match=r"trainer_optimizer.*Supported: transformers >= 5\.2"
    ):
        plugin._register(registry.list_optimizers(), just_loaded=fake)
    assert list(fake.OptimizerNames._value2member_map_) == ["adamw_torch"]
    with pytest.warns(RuntimeWarning, match="not registered"):
        plugin.on_module_loaded(fake)
    monkeypatch.undo()
    assert plugin._module_exists("transformers.trainer_optimizer") and not plugin._module_exists("transformers.nope")


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
    assert cls_kwargs == (hf_optim.Adafactor, {"preset": "adafactor_v2", "lr": 1e-2, "weight_decay": 0.1, "beta1": 0.8})
    trainer = Trainer(
        model=model, args=args, train_dataset=RuleDataset(12, 16, 64), optimizer_cls_and_kwargs=cls_kwargs
    )
    trainer.train()
    optimizer = trainer.optimizer.optimizer
    assert type(optimizer) is hf_optim.Adafactor and [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    assert all(g["beta1"] == 0.8 for g in optimizer.param_groups)
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])
