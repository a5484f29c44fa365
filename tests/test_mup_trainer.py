"""A real muP LLaMA through the Hugging Face Trainer (`--optim adamw_v2` / `adafactor_v2` parsed from a command line).

The multipliers the optimizer's groups must carry are computed here by hand from the configs (hidden 128 vs base 32,
MLP 512 vs base 64), not read from the plan.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama_config

import mup_integration as mi

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from train_tiny_clm import RuleDataset

transformers = pytest.importorskip("transformers")
from transformers import HfArgumentParser, Trainer, TrainingArguments  # noqa: E402

LR, WD = 1e-2, 1e-4
# hand-computed: attention matrices 128/32 = 4 on both sides; up/gate: fan-in 4; down: fan-in 512/64 = 8
EXPECTED_LR_MULT = {
    "model.layers.0.self_attn.q_proj.weight": 1 / 4,
    "model.layers.1.self_attn.o_proj.weight": 1 / 4,
    "model.layers.0.mlp.up_proj.weight": 1 / 4,
    "model.layers.1.mlp.down_proj.weight": 1 / 8,
    "model.embed_tokens.weight": 1.0,
    "lm_head.weight": 1.0,
    "model.norm.weight": 1.0,
}


def _parse(tmp_path, optim: str, *extra: str) -> TrainingArguments:
    argv = [
        "--output_dir",
        str(tmp_path),
        "--optim",
        optim,
        "--learning_rate",
        str(LR),
        "--weight_decay",
        str(WD),
        "--max_steps",
        "25",
        "--per_device_train_batch_size",
        "8",
        "--lr_scheduler_type",
        "constant",
        "--logging_steps",
        "5",
        "--save_strategy",
        "no",
        "--report_to",
        "none",
        "--use_cpu",
        "--disable_tqdm",
        "true",
        *extra,
    ]
    (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(argv)
    return args


def _mup_llama():
    torch.manual_seed(0)
    cfg = tiny_llama_config(hidden_size=128, intermediate_size=512)
    return mi.make_mup_model(cfg, base_width=32, base_intermediate_size=64)


@pytest.mark.parametrize("optim", ["adamw_v2", "adafactor_v2"])
def test_mup_llama_trains_and_groups_carry_the_multipliers(tmp_path, optim):
    model = _mup_llama()
    args = _parse(tmp_path, optim)
    trainer = Trainer(model=model, args=args, train_dataset=RuleDataset(200, 16, 64))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()

    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < 0.8 * losses[0], losses
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters()), "a parameter did not move"

    optimizer = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert type(optimizer).__module__.startswith("hf_optim.")
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert len(group_of) == len(params)  # every parameter is in exactly one group
    for name, mult in EXPECTED_LR_MULT.items():
        group = group_of[id(params[name])]
        assert group["lr"] == pytest.approx(LR * mult, rel=1e-12), name  # constant schedule: lr stays the peak
        assert group.get("lr_mult", 1.0) == pytest.approx(mult, rel=1e-12), name
    # width-aware decay (the default rule): hidden matrices and embeddings decay with lambda per step, vectors not
    for name in ("model.layers.1.mlp.down_proj.weight", "model.embed_tokens.weight"):
        group = group_of[id(params[name])]
        assert (group["weight_decay"], group["weight_decay_mode"]) == (WD, "independent"), name
    assert group_of[id(params["model.norm.weight"])]["weight_decay"] == 0.0


def test_mup_wd_rule_mup_through_optim_args(tmp_path):
    model = _mup_llama()
    args = _parse(tmp_path, "adamw_v2", "--optim_args", "mup_wd_rule=mup")
    optimizer = Trainer(model=model, args=args, train_dataset=RuleDataset(8, 16, 64)).create_optimizer()
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    down = group_of[id(model.model.layers[1].mlp.down_proj.weight)]
    # mup 1.0.0's MuAdamW: lr / m and wd * m, so the lr-coupled per-step decay is lr * wd at every width
    assert down["lr"] == pytest.approx(LR / 8) and down["weight_decay"] == pytest.approx(WD * 8)


def test_trained_mup_model_saves_and_reloads_with_surgery(tmp_path):
    model = _mup_llama()
    args = _parse(tmp_path / "run", "adamw_v2", "--max_steps", "3")
    trainer = Trainer(model=model, args=args, train_dataset=RuleDataset(24, 16, 64))
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    loaded = mi.load_mup_model(str(tmp_path / "final"))
    assert mi.is_mup_applied(loaded) and mi.get_plan(loaded) == mi.get_plan(model)
    for (name, a), (_, b) in zip(loaded.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name  # the trained weights, not a fresh muP init
    ids = torch.arange(16).view(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model.eval()(ids).logits, rtol=0, atol=0)


# --- settings that cannot take the plan's multipliers are refused, not silently changed -----------------------------


def _create(tmp_path, optim: str, *optim_args: str, model=None):
    model = model if model is not None else _mup_llama()
    extra = ("--optim_args", ",".join(optim_args)) if optim_args else ()
    args = _parse(tmp_path, optim, *extra)
    optimizer = Trainer(model=model, args=args, train_dataset=RuleDataset(8, 16, 64)).create_optimizer()
    return model, {id(p): g for g in optimizer.param_groups for p in g["params"]}


def test_explicit_decay_mode_conflicting_with_the_independent_rule_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"weight_decay_mode='coupled' conflicts with mup_wd_rule='independent'"):
        _create(tmp_path, "adamw_v2", "weight_decay_mode=coupled")
    # the same mode the rule sets is no conflict
    model, group_of = _create(tmp_path, "adamw_v2", "weight_decay_mode=independent")
    assert group_of[id(model.model.layers[0].mlp.up_proj.weight)]["weight_decay_mode"] == "independent"


def test_mup_rule_with_an_lr_independent_decay_mode_is_an_error(tmp_path):
    # adafactor_v2 decays independently of the lr by default: wd * m would then grow with width
    with pytest.raises(ValueError, match=r"weight_decay_mode='independent'.*grow with width"):
        _create(tmp_path, "adafactor_v2", "mup_wd_rule=mup")
    model, group_of = _create(tmp_path, "adafactor_v2", "mup_wd_rule=mup", "weight_decay_mode=coupled")
    down = group_of[id(model.model.layers[1].mlp.down_proj.weight)]
    assert (down["lr"], down["weight_decay"], down["weight_decay_mode"]) == pytest.approx((LR / 8, WD * 8, "coupled"))


def test_none_rule_through_optim_args(tmp_path):
    # "none" is the rule's name, not Python's None
    _, group_of = _create(tmp_path, "adamw_v2", "mup_wd_rule=none")
    assert {g["weight_decay"] for g in group_of.values()} == {0.0}
    with pytest.raises(ValueError, match=r"mup_wd_rule must be one of \['independent', 'mup', 'none'\]"):
        _create(tmp_path, "adamw_v2", "mup_wd_rule=nope")


def test_parameter_scaling_adafactor_gets_inverse_sqrt_width_lr(tmp_path):
    # With scale_parameter=True each step is already multiplied by RMS(W), and a muP hidden matrix has
    # RMS(W) = sigma / sqrt(fan_in_mult) (its init): so lr / sqrt(m) gives the muP step size sigma * lr / m.
    model = _mup_llama()
    up = model.model.layers[0].mlp.up_proj.weight  # fan-in mult 4
    rms_ratio = up.detach().pow(2).mean().sqrt().item() / model.config.initializer_range
    assert rms_ratio == pytest.approx(1 / math.sqrt(4), rel=0.05)  # the premise, measured
    _, group_of = _create(tmp_path, "adafactor_v2", "scale_parameter=true", model=model)
    params = dict(model.named_parameters())
    for name, mult in EXPECTED_LR_MULT.items():
        assert group_of[id(params[name])]["lr"] == pytest.approx(LR * math.sqrt(mult), rel=1e-12), name


def test_model_with_a_plan_but_no_surgery_is_refused(tmp_path):
    model = _mup_llama()
    model.save_pretrained(tmp_path / "saved")
    plain = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "saved")  # plan in config, no forward changes
    assert plain.config.hf_optim_mup and not mi.is_mup_applied(plain)
    with pytest.raises(ValueError, match=r"not its forward changes.*apply_mup\(model, init=False\).*mup=false"):
        _create(tmp_path, "adamw_v2", model=plain)
    _create(tmp_path, "adamw_v2", "mup=false", model=plain)  # the explicit opt-out still works
    mi.apply_mup(plain, init=False)
    _create(tmp_path, "adamw_v2", model=plain)


def test_optimizer_without_param_overrides_is_refused_under_mup(tmp_path, monkeypatch):
    import hf_optim
    from hf_optim import registry

    class PlainSGD(torch.optim.SGD):  # no param_overrides argument, no **kwargs
        def __init__(self, params, lr=1e-3, weight_decay=0.0):
            super().__init__(params, lr=lr, weight_decay=weight_decay)

    monkeypatch.setitem(sys.modules, "plain_sgd_test_module", type(sys)("plain_sgd_test_module"))
    sys.modules["plain_sgd_test_module"].PlainSGD = PlainSGD
    spec = hf_optim.OptimizerSpec("plain_sgd_test", "plain_sgd_test_module:PlainSGD", "test-only", adam_args=False)
    try:
        hf_optim.register_optimizer(spec)
        with pytest.raises(TypeError, match=r"does not accept param_overrides.*mup=false"):
            _create(tmp_path, "plain_sgd_test")
        _model, group_of = _create(tmp_path, "plain_sgd_test", "mup=false")
        assert {g["lr"] for g in group_of.values()} == {LR}
    finally:
        registry._REGISTRY.pop(spec.name, None)


def test_wrapped_model_is_looked_through(tmp_path):
    from hf_optim.integrations.transformers.trainer import optimizer_cls_and_kwargs

    model = _mup_llama()
    wrapper = torch.nn.Module()
    wrapper.module = model  # what DDP looks like from the outside
    args = _parse(tmp_path, "adamw_v2")
    _, kwargs = optimizer_cls_and_kwargs("adamw_v2", args, wrapper)
    assert kwargs["param_overrides"][model.model.layers[1].mlp.down_proj.weight]["lr_mult"] == pytest.approx(1 / 8)
