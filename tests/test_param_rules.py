"""Parameter-group rules and layer decay (issue 28): hand-computed multipliers in float64, the first-match rule,
errors that name the closest parameters, frozen parameters without state, composition with muP, and the same groups
through every entry point."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM, Trainer, TrainingArguments

import hf_optim

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_llama_config

LR, WD = 2.0**-7, 0.1


def _llama(layers: int = 3, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(num_layers=layers, **kw))


def _lr_of(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, dict]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: {k: v for k, v in g.items() if k != "params"} for g in opt.param_groups for p in g["params"]}


def _expected_exponent(name: str, blocks: int, block_key: str) -> int:
    """Layer-decay exponent L - i written out by hand: embeddings i=0, block k i=k+1, the rest i=L; L=blocks+1."""
    top = blocks + 1
    parts = name.split(".")
    if block_key in parts:
        return top - (int(parts[parts.index(block_key) + 1]) + 1)
    if "embed_tokens" in name or ".wte." in f".{name}" or ".wpe." in f".{name}":
        return top
    return 0


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_layer_decay_is_lr_times_decay_to_the_L_minus_i(arch):
    if arch == "llama":
        model, blocks, key = _llama(3), 3, "layers"
    else:
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=4, n_head=4, vocab_size=64, n_positions=32))
        blocks, key = 4, "h"
    decay = 0.8
    opt = hf_optim.create_optimizer("adamw_v2", model, lr=LR, layer_decay=decay)
    got = _lr_of(model, opt)
    for name, settings in got.items():
        expected = float(
            torch.tensor(LR, dtype=torch.float64)
            * torch.tensor(decay, dtype=torch.float64) ** _expected_exponent(name, blocks, key)
        )
        assert settings["lr"] == pytest.approx(expected, rel=1e-12), name
    assert len({round(s["lr"], 15) for s in got.values()}) == blocks + 2  # embeddings, each block, the head


def test_layer_decay_reaches_the_update():
    """One plain SGD step: the embedding moves by exactly decay^L of what it moves without layer decay."""
    decay, moves = 0.5, []
    for layer_decay in (None, decay):
        model = _llama(2)
        before = model.model.embed_tokens.weight.detach().clone()
        opt = hf_optim.create_optimizer("sgdw_v2", model, lr=0.1, layer_decay=layer_decay)
        ids = torch.arange(16).reshape(2, 8)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        moves.append((model.model.embed_tokens.weight.detach() - before).double())
    ratio = moves[1].norm() / moves[0].norm()
    assert ratio.item() == pytest.approx(decay**3, rel=1e-5)  # L = 2 blocks + 1


def test_first_matching_rule_wins_and_values_reach_the_groups():
    model = _llama(2, attention_bias=True)
    rules = [
        {"match": r"layers\.0\.", "lr_mult": 0.25},
        {"match": r"self_attn", "lr_mult": 2.0, "weight_decay": 0.0},
    ]
    got = _lr_of(model, hf_optim.create_optimizer("adamw_v2", model, lr=LR, weight_decay=WD, groups=rules))
    assert got["model.layers.0.self_attn.q_proj.weight"]["lr"] == LR * 0.25  # rule 0 took it; rule 1 never sees it
    assert got["model.layers.0.self_attn.q_proj.weight"]["weight_decay"] == WD
    assert got["model.layers.1.self_attn.q_proj.weight"] == {
        **got["model.layers.1.self_attn.q_proj.weight"],
        "lr": LR * 2,
        "weight_decay": 0.0,
    }
    assert got["model.layers.1.self_attn.q_proj.bias"]["lr"] == LR * 2  # the attention bias belongs to rule 1
    mlp = got["model.layers.1.mlp.up_proj.weight"]
    assert mlp["lr"] == LR and mlp["weight_decay"] == WD and mlp["weight_decay_mode"] == "coupled"


def test_a_rule_on_a_bias_overrides_the_default_no_decay_split():
    model = _llama(1, attention_bias=True)
    rules = [{"match": r"\.bias$", "weight_decay": 0.05, "weight_decay_mode": "independent"}]
    got = _lr_of(model, hf_optim.create_optimizer("adamw_v2", model, lr=LR, weight_decay=WD, groups=rules))
    bias = got["model.layers.0.self_attn.q_proj.bias"]
    assert bias["weight_decay"] == 0.05 and bias["weight_decay_mode"] == "independent"
    assert got["model.norm.weight"]["weight_decay"] == 0.0


def test_frozen_parameters_get_no_gradient_and_no_state():
    model = _llama(2)
    opt = hf_optim.create_optimizer("adamw_v2", model, lr=LR, groups=[{"match": r"embed_tokens", "freeze": True}])
    emb = model.model.embed_tokens.weight
    assert not emb.requires_grad and all(emb is not p for g in opt.param_groups for p in g["params"])
    before = emb.detach().clone()
    ids = torch.arange(16).reshape(2, 8)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert emb.grad is None and torch.equal(emb, before) and emb not in opt.state
    assert len(opt.state) == sum(len(g["params"]) for g in opt.param_groups)


def test_rules_compose_with_mup_multipliers():
    from mup_integration import make_mup_model

    torch.manual_seed(0)
    model = make_mup_model(tiny_llama_config(hidden_size=64), base_width=16)  # width_mult 4
    plain = _lr_of(model, hf_optim.create_optimizer("adamw_v2", model, lr=LR))
    ruled = _lr_of(
        model, hf_optim.create_optimizer("adamw_v2", model, lr=LR, groups=[{"match": "mlp", "lr_mult": 0.5}])
    )
    hidden = "model.layers.0.mlp.up_proj.weight"
    assert plain[hidden]["lr"] == pytest.approx(LR / 4, rel=1e-12)
    assert ruled[hidden]["lr"] == pytest.approx(LR / 4 * 0.5, rel=1e-12)
    assert ruled["model.layers.0.self_attn.q_proj.weight"] == plain["model.layers.0.self_attn.q_proj.weight"]


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        (
            [{"match": r"mlp\.up_projj", "lr_mult": 2.0}],
            r"matches no parameter; closest names: \['model\.layers\.0\.mlp\.up_proj",
        ),
        (
            [{"match": "mlp", "lr_mult": 2.0}, {"match": "up_proj", "lr_mult": 3.0}],
            r"rule 1 .*only parameters taken by earlier rule\(s\) \[0\]",
        ),
        ([{"match": "mlp", "lr_mul": 2.0}], r"unknown key\(s\) \['lr_mul'\].*Did you mean 'lr_mult'"),
        ([{"match": "mlp", "freeze": True, "lr_mult": 2.0}], r"a frozen rule takes no other value"),
        ([{"match": "mlp"}], r"sets nothing"),
        ([{"match": "(", "lr_mult": 2.0}], r"is not a regular expression"),
        ([{"match": "mlp", "lr_mult": -1}], r"lr_mult must be a finite number >= 0"),
        ([{"match": "mlp", "weight_decay_mode": "decoupled"}], r"weight_decay_mode must be one of"),
    ],
)
def test_bad_rules_are_errors_naming_the_rule(rules, message):
    with pytest.raises((ValueError, TypeError), match=message):
        hf_optim.create_optimizer("adamw_v2", _llama(1), lr=LR, groups=rules)


def test_layer_decay_bad_values_and_models_without_blocks():
    with pytest.raises(ValueError, match=r"layer_decay must be a number in \(0, 1\]"):
        hf_optim.create_optimizer("adamw_v2", _llama(1), lr=LR, layer_decay=1.5)
    with pytest.raises(ValueError, match="numbered blocks"):
        hf_optim.create_optimizer("adamw_v2", torch.nn.Linear(3, 3), lr=LR, layer_decay=0.8)
    with pytest.raises(ValueError, match="need a model"):
        hf_optim.create_optimizer("adamw_v2", list(_llama(1).parameters()), lr=LR, layer_decay=0.8)


def test_a_bad_rules_file_fails_at_argument_parsing(tmp_path):
    from transformers import HfArgumentParser

    (tmp_path / "g.yaml").write_text("- {match: mlp, lr_mul: 2}\n")
    argv = ["--output_dir", str(tmp_path), "--optim", "adamw_v2", "--optim_args", f"groups={tmp_path / 'g.yaml'}"]
    with pytest.raises((ValueError, SystemExit)) as info:
        HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(argv)
    assert "lr_mul" in str(info.value) or info.type is SystemExit


GROUPS = [
    {"match": r"layers\.0\.self_attn", "lr_mult": 0.5},
    {"match": r"mlp\.down_proj", "weight_decay": 0.01, "weight_decay_mode": "independent"},
    {"match": r"embed_tokens", "freeze": True},
]


def test_one_door_with_a_groups_file(tmp_path):
    """Trainer (--optim_args groups=FILE,layer_decay=0.8), create_optimizer, hf-optim train's recipe and a sweep cell
    build identical groups, frozen parameters left out by all four. λ = 0 outside the rules, because a sweep cell's
    decay split (train.decay: all / hidden) is not the Trainer's; the rule's λ must reach all four alike."""
    from hf_optim.runner import schema, train
    from hf_optim.runner._sweep_cell import build_optimizer
    from hf_optim.runner._sweep_config import load_config

    path = tmp_path / "groups.yaml"
    path.write_text(yaml.safe_dump(GROUPS))
    wd = 0.0

    def factory(model, out):
        return hf_optim.create_optimizer("adamw_v2", model, lr=LR, weight_decay=wd, groups=str(path), layer_decay=0.8)

    def trainer(model, out):
        args = TrainingArguments(
            output_dir=str(out), report_to=[], use_cpu=True, save_strategy="no", optim="adamw_v2",
            optim_args=f"groups={path},layer_decay=0.8", learning_rate=LR, weight_decay=wd,
        )  # fmt: skip
        return Trainer(model=model, args=args).create_optimizer()

    def recipe(model, out):
        overrides = [
            "optimizer.name=adamw_v2", f"optimizer.lr={LR}", f"optimizer.weight_decay={wd}",
            "optimizer.weight_decay_mode=coupled", "optimizer.betas=[0.9, 0.999]", "optimizer.eps=1e-8",
            "optimizer.args={}", f"optimizer.groups={yaml.safe_dump(GROUPS, default_flow_style=True).strip()}",
            "optimizer.layer_decay=0.8",
        ]  # fmt: skip
        args = TrainingArguments(
            output_dir=str(out), report_to=[], use_cpu=True, save_strategy="no", learning_rate=LR, weight_decay=wd
        )
        return train._make_trainer_class()(
            model=model, args=args, recipe=schema.load("demo", overrides)
        ).create_optimizer()

    def sweep(model, out):
        opt = {
            "name": "adamw_v2",
            "weight_decay_mode": "coupled",
            "weight_decay": [wd],
            "args": {"groups": str(path), "layer_decay": 0.8},
        }
        config = {
            "name": "one_door", "model": {"layers": 2, "head_dim": 16},
            "train": {"steps": 1, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "decay": "hidden"},
            "grids": [{"name": "g", "width": [32], "log2_lr": [-7], "parametrization": ["sp"], "optimizer": [opt]}],
        }  # fmt: skip
        (out / "c.yaml").write_text(yaml.safe_dump(config))
        (cell,) = load_config(out / "c.yaml").cells
        return build_optimizer(model, cell)

    tables = {}
    for name, build in {"factory": factory, "trainer": trainer, "train": recipe, "sweep": sweep}.items():
        (tmp_path / name).mkdir()
        model = _llama(2)
        tables[name] = _lr_of(model, build(model, tmp_path / name))
        assert "model.embed_tokens.weight" not in tables[name] and not model.model.embed_tokens.weight.requires_grad
    for name, table in tables.items():
        assert table == tables["factory"], name
    ref = tables["factory"]
    assert ref["model.layers.0.self_attn.q_proj.weight"]["lr"] == pytest.approx(LR * 0.5 * 0.8**2, rel=1e-12)
    down = ref["model.layers.1.mlp.down_proj.weight"]
    assert down["weight_decay_mode"] == "independent" and down["weight_decay"] == 0.01
