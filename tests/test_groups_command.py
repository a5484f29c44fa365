"""``hf-optim groups`` (issue 28): the table of a recipe and of a model config, against multipliers written out by
hand (muP's base_width / width, layer decay d^(L-i), a rule's lr_mult) and the parameter count of the real model."""

from __future__ import annotations

import pytest
import yaml
from transformers import GPT2Config, GPT2LMHeadModel

from hf_optim.runner import groups
from hf_optim.runner._train_model import MODEL_DEFAULTS, build_model


def _rows(argv: list[str]) -> dict[str, dict]:
    args = groups.parse_args(argv)
    model, optimizer, _ = groups.model_and_optimizer(args)
    return {r["pattern"]: r for r in groups.group_table(model, optimizer, fold=not args.names)}


def test_demo_table_has_mup_multipliers_and_every_parameter():
    rows = _rows(["demo"])
    lr, width, base = 1e-2, 128, 32  # the demo recipe: lr, model.hidden_size, model.mup.base_width
    hidden = rows["model.layers.[0-3].mlp.up_proj.weight"]
    assert hidden["lr"] == pytest.approx(lr * base / width) and hidden["tensors"] == 4
    assert hidden["elements"] == 4 * 384 * 128
    assert rows["model.embed_tokens.weight"]["lr"] == pytest.approx(lr)
    assert rows["model.norm.weight"]["weight_decay"] == 0  # the no-decay split
    assert {r["mode"] for r in rows.values()} == {"independent"}
    cfg = {**MODEL_DEFAULTS, "hidden_size": 128, "num_layers": 4, "num_heads": 4, "intermediate_size": 384}
    real = build_model(cfg, 65, 128)  # the demo's char vocabulary of tiny Shakespeare has 65 symbols
    assert sum(r["elements"] for r in rows.values()) == sum(p.numel() for p in real.parameters())
    assert sum(r["tensors"] for r in rows.values()) == len(list(real.parameters()))


def test_rules_and_layer_decay_reach_the_table(tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump([{"match": "embed_tokens", "freeze": True}, {"match": "lm_head", "lr_mult": 0.5}]))
    rows = _rows(["demo", "--groups", str(rules), "--layer-decay", "0.8"])
    assert rows["model.embed_tokens.weight"]["lr"] is None  # frozen: not in the optimizer
    top = 4 + 1  # L = blocks + 1
    for block in range(4):
        row = rows[f"model.layers.{block}.self_attn.q_proj.weight"]
        assert row["lr"] == pytest.approx(1e-2 * 0.25 * 0.8 ** (top - (block + 1)), rel=1e-12)
    assert rows["lm_head.weight"]["lr"] == pytest.approx(1e-2 * 0.5)


def test_model_config_directory(tmp_path):
    config = GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=64, n_positions=32)
    config.save_pretrained(tmp_path)
    rows = _rows([str(tmp_path), "--lr", "0.004", "--weight-decay", "0.1", "--layer-decay", "0.5"])
    assert rows["transformer.wte.weight"]["lr"] == pytest.approx(0.004 * 0.5**4)
    assert rows["transformer.h.2.attn.c_attn.weight"]["lr"] == pytest.approx(0.004 * 0.5)
    assert rows["transformer.h.0.attn.c_attn.bias"]["weight_decay"] == 0
    assert rows["transformer.h.0.attn.c_attn.weight"]["weight_decay"] == pytest.approx(0.1)
    real = GPT2LMHeadModel(config)
    assert sum(r["elements"] for r in rows.values()) == sum(p.numel() for p in real.parameters())


def test_folding_of_layer_numbers():
    assert groups._ranges({0, 1, 2, 5, 7, 8}) == "0-2,5,7-8"
    assert groups._fold(["m.layers.0.w", "m.layers.1.w", "m.layers.3.w"]) == "m.layers.[0-1,3].w"
    assert groups._fold(["m.layers.2.experts.0.w", "m.layers.2.experts.1.w"]) == "m.layers.2.experts.[0-1].w"


def test_main_prints_the_table(capsys):
    assert groups.main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.[0-3].self_attn.q_proj.weight" in out and "(x0.25)" in out


@pytest.mark.parametrize(
    "argv",
    [["demo", "--lr", "3"], ["demo", "--optim", "sgdw_v2"]],
)
def test_model_config_options_with_a_recipe_are_an_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        groups.parse_args(argv)
    assert exit_info.value.code == 2
    assert "apply to a model config" in capsys.readouterr().err


def test_missing_model_config_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        _rows([str(tmp_path / "missing.json")])
