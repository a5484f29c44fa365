"""Every entry point builds the same optimizer: the Trainer plugin, ``create_optimizer``, ``hf-optim train`` (the
recipe runner's Trainer) and ``hf-optim sweep`` (a sweep cell), for every registered name x Adafactor preset x
{SP model, muP model with base width != width}.

Compared per parameter (by name): effective lr, weight decay, weight_decay_mode and lr_peak, plus every other group
key (the knobs). For the parameter-scaling presets (palm, t5) the muP hidden matrices get lr / sqrt(width_mult),
computed here from the plan's width multiplier, not from the code under test.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import LlamaForCausalLM, Trainer, TrainingArguments

import hf_optim
from hf_optim.optim.adafactor.presets import PRESETS

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_llama_config

LR, WD, BETAS, EPS = 2.0**-7, 1e-4, (0.9, 0.95), 1e-6
WIDTH, BASE_WIDTH = 64, 16  # width_mult 4
CASES = [(s.name, None) for s in hf_optim.list_optimizers() if s.target.startswith("hf_optim.")] + [
    ("adafactor_v2", preset) for preset in sorted(PRESETS) if preset != "adafactor_v2"
]


def _model(mup: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    config = tiny_llama_config(hidden_size=WIDTH)
    if not mup:
        return LlamaForCausalLM(config)
    from mup_integration import make_mup_model

    return make_mup_model(config, base_width=BASE_WIDTH)


def _per_param(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, dict]:
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for group in optimizer.param_groups:
        settings = {k: v for k, v in group.items() if k != "params"}
        for p in group["params"]:
            out[names[id(p)]] = settings
    assert set(out) == set(names.values()), "every parameter is in exactly one group"
    return out


def _via_trainer(model, name, preset, tmp_path):
    args = TrainingArguments(
        output_dir=str(tmp_path),
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        optim=name,
        optim_args=f"preset={preset},weight_decay_mode=independent" if preset else "weight_decay_mode=independent",
        learning_rate=LR,
        weight_decay=WD,
        adam_beta1=BETAS[0],
        adam_beta2=BETAS[1],
        adam_epsilon=EPS,
    )
    return Trainer(model=model, args=args).create_optimizer()


def _via_factory(model, name, preset, tmp_path):
    spec = hf_optim.get_spec(name)
    knobs = {"weight_decay_mode": "independent", **({"preset": preset} if preset else {})}
    if spec.takes_betas:
        knobs["betas"] = BETAS
    if spec.takes_eps:
        knobs["eps"] = EPS
    return hf_optim.create_optimizer(name, model, lr=LR, weight_decay=WD, **knobs)


def _via_train(model, name, preset, tmp_path):
    from hf_optim.runner import schema, train

    spec = hf_optim.get_spec(name)
    overrides = [
        f"optimizer.name={name}",
        f"optimizer.lr={LR}",
        f"optimizer.weight_decay={WD}",
        "optimizer.weight_decay_mode=independent",
        f"optimizer.betas=[{BETAS[0]}, {BETAS[1]}]" if spec.takes_betas else "optimizer.betas=null",
        f"optimizer.eps={EPS}" if spec.takes_eps else "optimizer.eps=null",
        "optimizer.args={" + (f"preset: {preset}" if preset else "") + "}",
    ]
    recipe = schema.load("demo", overrides)
    # As hf_optim.runner.train sets them: the Trainer writes args.weight_decay into the decay group.
    args = TrainingArguments(
        output_dir=str(tmp_path), report_to=[], use_cpu=True, save_strategy="no", learning_rate=LR, weight_decay=WD
    )
    return train._make_trainer_class()(model=model, args=args, recipe=recipe).create_optimizer()


def _via_sweep(model, name, preset, tmp_path):
    from hf_optim.runner._sweep_cell import build_optimizer
    from hf_optim.runner._sweep_config import load_config

    optimizer = {"name": name, "weight_decay_mode": "independent", "weight_decay": [WD]}
    if preset:
        optimizer["args"] = {"preset": preset}
    config = {
        "name": "one_door",
        "model": {"layers": 2, "head_dim": 16, "base_width": BASE_WIDTH},
        "train": {"steps": 1, "beta1": BETAS[0], "beta2": BETAS[1], "eps": EPS},
        "grids": [
            {"name": "g", "width": [WIDTH], "log2_lr": [-7], "parametrization": ["sp"], "optimizer": [optimizer]}
        ],
    }
    path = tmp_path / "one_door.yaml"
    path.write_text(yaml.safe_dump(config))
    (cell,) = load_config(path).cells
    return build_optimizer(model, cell)


ENTRY_POINTS = {"trainer": _via_trainer, "train": _via_train, "sweep": _via_sweep}


@pytest.mark.parametrize("mup", [False, True], ids=["sp", "mup"])
@pytest.mark.parametrize(("name", "preset"), CASES, ids=[f"{n}-{p or 'default'}" for n, p in CASES])
def test_every_entry_point_builds_the_same_optimizer(name, preset, mup, tmp_path):
    model = _model(mup)
    reference = _per_param(model, _via_factory(model, name, preset, tmp_path))
    for entry, build in ENTRY_POINTS.items():
        (tmp_path / entry).mkdir()
        got = _per_param(model, build(model, name, preset, tmp_path / entry))
        for param, settings in reference.items():
            assert got[param] == settings, f"{entry} differs from create_optimizer for {param}"
    hidden = reference["model.layers.0.mlp.up_proj.weight"]
    vector = reference["model.norm.weight"]
    if hf_optim.get_spec(name).router is not None:  # Muon: hidden matrices Muon, embeddings / head / vectors not
        assert hidden["rule"] == "muon" and vector["rule"] == "fallback"
        assert reference["model.embed_tokens.weight"]["rule"] == reference["lm_head.weight"]["rule"] == "fallback"
    assert hidden["weight_decay_mode"] == "independent" and vector["weight_decay"] == 0.0
    if mup:
        family = hf_optim.get_spec(name).mup_rule({**hf_optim.get_spec(name).knobs(preset), "preset": preset})
        m = WIDTH / BASE_WIDTH
        # muon: an orthogonalised update's spectral norm does not grow with width (docs/mup.md), so no multiplier
        expected = {"adam": LR / m, "adam_param_scale": LR / math.sqrt(m), "sgd": LR, "muon": LR}[family]
        assert hidden["lr"] == pytest.approx(expected, rel=1e-12)
        if preset in ("palm", "t5"):  # parameter scaling: each step already scales with RMS(W) ∝ 1/sqrt(m)
            assert hidden["lr"] == pytest.approx(LR / math.sqrt(m), rel=1e-12)
    else:
        assert hidden["lr"] == LR


def test_factory_errors_name_the_argument():
    model = _model(False)
    with pytest.raises(ValueError, match=r"Unknown knob 'betta1'.*beta1"):
        hf_optim.create_optimizer("adafactor_v2", model, lr=1e-3, betta1=0.9)
    with pytest.raises(ValueError, match="given twice"):
        hf_optim.create_optimizer("adamw_v2", model, lr=1e-3, eps=1e-6, optim_args="eps=1e-7")
    with pytest.raises(ValueError, match="no_decay"):
        hf_optim.create_optimizer("adamw_v2", model, lr=1e-3, no_decay=["biases"])
    with pytest.raises(ValueError, match="needs a model"):
        hf_optim.create_optimizer("adamw_v2", list(model.parameters()), lr=1e-3, no_decay=["bias"])
    with pytest.raises(ValueError, match="no muP plan"):
        hf_optim.create_optimizer("adamw_v2", model, lr=1e-3, mup=True)
    with pytest.raises(TypeError, match="argument of its own"):
        hf_optim.resolve_optimizer("adamw_v2", model, lr=1e-3, knobs={"mup": True})


@pytest.mark.parametrize(
    "config",
    [
        dict(),  # LLaMA: RMSNorm modules, no biases
        dict(attention_bias=True, mlp_bias=True),
    ],
)
def test_default_split_is_the_trainers(config, tmp_path):
    from hf_optim.factory import decay_parameter_names

    torch.manual_seed(0)
    llama = LlamaForCausalLM(tiny_llama_config(**config))
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32))
    trainer = Trainer(model=llama, args=TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True))
    for model in (llama, gpt2):
        names = [n for n, _ in model.named_parameters()]  # a tied lm_head.weight is listed once, as wte
        expected = [n for n in names if n in trainer.get_decay_parameter_names(model)]
        assert decay_parameter_names(model) == expected and len(expected) < len(names)


def test_recipe_stating_betas_for_an_optimizer_without_them_is_refused():
    from hf_optim.runner import build, schema

    recipe = schema.load("llm/llama2", ["optimizer.name=adafactor_v2"])
    with pytest.raises(ValueError, match=r"optimizer.betas=.*adafactor_v2.*no betas"):
        build.optimizer_cls_and_kwargs(recipe, _model(False))


def test_plain_params_and_groups_pass_through():
    model = _model(False)
    params = list(model.parameters())
    opt = hf_optim.create_optimizer("sgdw_v2", params, lr=0.1, weight_decay=0.01)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == 0.01
    groups = [{"params": params[:2], "lr": 0.5}, {"params": params[2:]}]
    opt = hf_optim.create_optimizer("adamw_v2", groups, lr=0.1)
    assert [g["lr"] for g in opt.param_groups] == [0.5, 0.1]
