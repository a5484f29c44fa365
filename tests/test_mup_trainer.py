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
from train_tiny_clm import RuleDataset  # noqa: E402

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
    argv = ["--output_dir", str(tmp_path), "--optim", optim, "--learning_rate", str(LR), "--weight_decay", str(WD),
            "--max_steps", "25", "--per_device_train_batch_size", "8", "--lr_scheduler_type", "constant",
            "--logging_steps", "5", "--save_strategy", "no", "--report_to", "none", "--use_cpu", "--disable_tqdm",
            "true", *extra]
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
