"""Depth scaling (CompleteP / depth-µP): plan fields, the residual-branch multiplier, the per-parameter depth rules.

References are independent of the code under test: the rules of Dey et al. 2025 (arXiv 2505.01618, Table 1) written
out by hand in float64, torch.optim.AdamW fed hand-built groups, and the branch multiplier folded into the weights.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from conftest import tiny_gpt2_config, tiny_llama_config

import hf_optim
import mup_integration as mi
from mup_integration.depth import BranchMultiplier

ALPHAS = [0.5, 1.0]
FAMILIES = ["adam", "adam_param_scale", "sgd"]
WD_RULES = ["independent", "mup", "none"]


def cfg(arch: str, width: int = 32, layers: int = 2, **kw):
    if arch == "gpt2":
        return tiny_gpt2_config(n_embd=width, n_layer=layers, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, **kw)
    return tiny_llama_config(hidden_size=width, num_layers=layers, **kw)


def build(arch: str, width: int = 32, layers: int = 2, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return mi.make_mup_model(cfg(arch, width, layers), base_width=16, **kw).eval()


def by_name(model, **kw):
    ov = mi.param_overrides(model, **kw)
    return {name: ov[p] for name, p in model.named_parameters()}


def branch_hooks(model):
    return [h for m in model.modules() for h in m._forward_hooks.values() if isinstance(h, BranchMultiplier)]


IDS = torch.arange(14).view(2, 7) % 64


# ---- plan ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha, expected", [(0.5, 0.5), (1.0, 0.25)])  # (8/2)^-0.5, (8/2)^-1
def test_plan_fields_and_residual_multiplier(alpha, expected):
    plan = mi.make_plan(cfg("llama", 32, 8), base_width=16, base_depth=2, depth_alpha=alpha)
    assert (plan.base_depth, plan.depth, plan.depth_alpha) == (2, 8, alpha)
    assert plan.residual_multiplier == expected and plan.depth_mult == 4.0
    d = plan.to_dict()
    assert (d["base_depth"], d["depth"], d["depth_alpha"]) == (2, 8, alpha)
    assert mi.MuPPlan.from_dict(d) == plan


def test_width_only_plan_keeps_its_dict_and_old_dicts_load():
    plan = mi.make_plan(cfg("llama", 32), base_width=16)
    d = plan.to_dict()
    assert not {"base_depth", "depth", "depth_alpha"} & set(d)  # config.json of width-only models is unchanged
    loaded = mi.MuPPlan.from_dict(d)
    assert loaded.depth_alpha is None and loaded.residual_multiplier == 1.0 and loaded == plan


def test_explicit_shallow_base_config():
    base = cfg("llama", 16, 2)
    plan = mi.make_plan(cfg("llama", 32, 6), base, base_depth=2, depth_alpha=1.0)
    assert plan.depth == 6 and plan.width_mult == 2.0 and plan.residual_multiplier == pytest.approx(1 / 3, abs=1e-15)
    with pytest.raises(ValueError, match="base_depth=2 and depth_alpha"):
        mi.make_plan(cfg("llama", 32, 6), base)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"base_depth": 2}, ValueError, "both base_depth"),
        ({"depth_alpha": 1.0}, ValueError, "both base_depth"),
        ({"base_depth": 2, "depth_alpha": 0.3}, ValueError, r"depth_alpha must be in \[0.5, 1.0\]"),
        ({"base_depth": 2, "depth_alpha": 1.5}, ValueError, r"depth_alpha must be in \[0.5, 1.0\]"),
        ({"base_depth": 2, "depth_alpha": float("nan")}, ValueError, "depth_alpha must be finite"),
        ({"base_depth": 2, "depth_alpha": "1"}, TypeError, "depth_alpha must be a real number"),
        ({"base_depth": 0, "depth_alpha": 1.0}, ValueError, "base_depth must be > 0"),
        ({"base_depth": 2.0, "depth_alpha": 1.0}, TypeError, "base_depth must be an int"),
        ({"base_depth": True, "depth_alpha": 1.0}, TypeError, "base_depth must be an int"),
    ],
)
def test_bad_depth_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        mi.make_plan(cfg("llama", 32, 4), base_width=16, **kwargs)


def test_bad_stored_depth_fields():
    d = mi.make_plan(cfg("llama", 32, 4), base_width=16, base_depth=2, depth_alpha=1.0).to_dict()
    with pytest.raises(ValueError, match="both or neither"):
        mi.MuPPlan.from_dict({**d, "depth": None})
    with pytest.raises(ValueError, match="depth_alpha must be in"):
        mi.MuPPlan.from_dict({**d, "depth_alpha": 2.0})


def test_plan_for_another_depth_is_rejected():
    plan = mi.make_plan(cfg("llama", 32, 4), base_width=16, base_depth=2, depth_alpha=1.0)
    model = build("llama", 32, 4)
    with pytest.raises(ValueError, match=r"does not match|plan is for 4 layers"):
        mi.apply_mup(build("llama", 32, 6), plan, init=False)
    mi.apply_mup(model, plan, init=False)
    assert mi.is_mup_applied(model)


# ---- base depth = width-only muP, exactly --------------------------------------------------------------------
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_base_depth_is_exactly_width_only_mup(arch, alpha):
    width_only = build(arch, 32, 3)
    depth = build(arch, 32, 3, base_depth=3, depth_alpha=alpha)
    assert not branch_hooks(depth) and mi.is_mup_applied(depth)
    for (n, a), (_, b) in zip(depth.state_dict().items(), width_only.state_dict().items()):
        assert torch.equal(a, b), n
    with torch.no_grad():
        assert torch.equal(depth(IDS).logits, width_only(IDS).logits)
    for family in FAMILIES:
        for wd_rule in WD_RULES:
            eps = None if family == "sgd" else 1e-8
            assert by_name(depth, family=family, wd_rule=wd_rule, eps=eps) == by_name(
                width_only, family=family, wd_rule=wd_rule, eps=eps
            )
    groups = [mi.mup_param_groups(m, lr=1e-2, weight_decay=1e-4, eps=1e-8) for m in (depth, width_only)]
    names = [{id(p): n for n, p in m.named_parameters()} for m in (depth, width_only)]
    assert [
        (sorted(names[0][id(p)] for p in g["params"]), {k: x for k, x in g.items() if k != "params"}) for g in groups[0]
    ] == [
        (sorted(names[1][id(p)] for p in g["params"]), {k: x for k, x in g.items() if k != "params"}) for g in groups[1]
    ]


# ---- the residual-branch multiplier in the forward --------------------------------------------------------------
def _fold(model, arch: str, r: float) -> None:
    """Multiply every branch's last linear map (weight and bias) by ``r``: the same function as the hooks."""
    with torch.no_grad():
        if arch == "gpt2":
            for block in model.transformer.h:
                for proj in (block.attn.c_proj, block.mlp.c_proj):
                    proj.weight.mul_(r)
                    proj.bias.mul_(r)
        elif arch == "olmo2":  # the branch ends with a norm: scale its weight
            for layer in model.model.layers:
                layer.post_attention_layernorm.weight.mul_(r)
                layer.post_feedforward_layernorm.weight.mul_(r)
        else:
            for layer in model.model.layers:
                layer.self_attn.o_proj.weight.mul_(r)
                layer.mlp.down_proj.weight.mul_(r)


def _olmo2_config(layers: int):
    from transformers import Olmo2Config

    return Olmo2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("arch", ["llama", "gpt2", "olmo2"])
def test_branch_multiplier_equals_folded_weights(arch, alpha):
    from transformers import AutoModelForCausalLM

    config = _olmo2_config(8) if arch == "olmo2" else cfg(arch, 32, 8)
    torch.manual_seed(0)
    depth = mi.make_mup_model(config, base_width=16, base_depth=2, depth_alpha=alpha).eval()
    r = 4.0**-alpha  # m_L = 8 / 2
    assert len(branch_hooks(depth)) == 16 and all(h.multiplier == r for h in branch_hooks(depth))
    folded = copy.deepcopy(depth)
    mi.apply_mup(folded, mi.make_plan(config, base_width=16), init=False)  # width-only surgery, same weights
    assert not branch_hooks(folded)
    _fold(folded, arch, r)
    with torch.no_grad():
        torch.testing.assert_close(depth(IDS).logits, folded(IDS).logits, rtol=1e-5, atol=1e-6)
        plain = AutoModelForCausalLM.from_config(config).eval()
        plain.load_state_dict(depth.state_dict())
        assert not torch.allclose(depth(IDS).logits, plain(IDS).logits, rtol=1e-3, atol=1e-4)


def test_gpt2_c_proj_init_keeps_the_base_depth_std():
    torch.manual_seed(0)
    config = tiny_gpt2_config(n_embd=256, n_layer=8)
    model = mi.make_mup_model(config, base_width=64, base_depth=2, depth_alpha=1.0)  # m_N = 4
    sigma = config.initializer_range
    proj = torch.cat([b.attn.c_proj.weight.flatten() for b in model.transformer.h])
    assert proj.std().item() == pytest.approx(sigma / math.sqrt(2 * 2) / math.sqrt(4), rel=0.02)  # L_0 = 2, not 8


# ---- optimizer side: the rules by hand in float64 -----------------------------------------------------------------
def _hand_rule(
    name: str,
    kind: str,
    m_n: float,
    fan_ratio: float,
    m_l: float,
    alpha: float,
    family: str,
    wd_rule: str,
    eps: float | None,
) -> dict:
    """Table 1 of arXiv 2505.01618 (+ the SGD and independent-decay rules stated in docs/mup.md), float64."""
    in_block = ".layers." in name or ".h." in name
    width_lr = (
        {"adam": 1 / m_n, "adam_param_scale": 1 / math.sqrt(m_n), "sgd": 1 / fan_ratio}[family]
        if kind == "hidden"
        else (m_n if family == "sgd" else 1.0)
    )
    depth_lr = (m_l ** (2 * alpha - 1) if family == "sgd" else m_l ** (alpha - 1)) if in_block else 1.0
    out = {}
    if width_lr * depth_lr != 1.0:
        out["lr_mult"] = width_lr * depth_lr
    if eps is not None and in_block:
        out["eps"] = eps * m_l**-alpha
    if wd_rule == "none" or kind == "vector":
        out["weight_decay"] = 0.0
    elif wd_rule == "independent":
        out["weight_decay_mode"] = "independent"
        if depth_lr != 1.0:
            out["weight_decay_mult"] = depth_lr
    elif family == "sgd":
        wd = fan_ratio if kind == "hidden" else 1 / m_n
        if wd != 1.0:
            out["weight_decay_mult"] = wd
    elif kind == "hidden":
        out["weight_decay_mult"] = 1 / width_lr  # λ·m_N for Adam, no depth factor (Table 1)
    return out


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_overrides_at_depth_mult_four_follow_the_rules(arch, alpha):
    model = build(arch, 32, 8, base_depth=2, depth_alpha=alpha)  # m_N = 2, m_L = 4
    plan = mi.get_plan(model)
    for family in FAMILIES:
        for wd_rule in WD_RULES:
            eps = None if family == "sgd" else 1e-8
            got = by_name(model, family=family, wd_rule=wd_rule, eps=eps)
            for name, override in got.items():
                info = plan.params[name]
                expected = _hand_rule(name, info.kind, 2.0, info.fan_ratio, 4.0, alpha, family, wd_rule, eps)
                assert override.keys() == expected.keys(), (name, family, wd_rule)
                for key, value in expected.items():
                    assert override[key] == (pytest.approx(value, rel=1e-14) if isinstance(value, float) else value)


def test_eps_is_refused_for_sgd_and_checked():
    model = build("llama", 32, 4, base_depth=2, depth_alpha=1.0)
    with pytest.raises(ValueError, match="family='sgd'"):
        mi.param_overrides(model, family="sgd", eps=1e-8)
    with pytest.raises(ValueError, match="eps must be > 0"):
        mi.param_overrides(model, eps=-1.0)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_one_adamw_step_equals_torch_with_hand_built_groups(alpha):
    """hf_optim.AdamW + param_overrides (wd_rule='mup', lr-coupled decay) == torch.optim.AdamW whose groups carry
    lr η m_N^-1 m_L^(α-1), decay λ m_N, eps ε m_L^-α (hidden) etc. written out here."""
    model = build("llama", 32, 8, base_depth=2, depth_alpha=alpha)
    reference = copy.deepcopy(model)
    lr, wd, eps, m_n, m_l = 1e-2, 0.1, 1e-6, 2.0, 4.0
    opt = hf_optim.AdamW(
        model.parameters(),
        lr=lr,
        weight_decay=wd,
        eps=eps,
        implementation="for-loop",
        param_overrides=mi.param_overrides(model, wd_rule="mup", eps=eps),
    )
    groups = []
    for name, p in reference.named_parameters():
        block = ".layers." in name
        hidden = block and p.dim() == 2
        group_lr = lr * (1 / m_n if hidden else 1.0) * (m_l ** (alpha - 1) if block else 1.0)
        group_wd = wd * m_n if hidden else (0.0 if p.dim() == 1 else wd)
        groups.append(
            {"params": [p], "lr": group_lr, "weight_decay": group_wd, "eps": eps * m_l**-alpha if block else eps}
        )
    ref_opt = torch.optim.AdamW(groups, lr=lr, foreach=False)
    for m, o in ((model, opt), (reference, ref_opt)):
        torch.manual_seed(1)
        m(input_ids=IDS, labels=IDS).loss.backward()
        o.step()
    for (n, a), (_, b) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8, msg=n)


@pytest.mark.parametrize("name, eps_knob", [("adamw_v2", "eps"), ("rmsprop_v2", "eps"), ("adam_atan2", None)])
def test_the_factory_passes_the_depth_rules_with_the_optimizers_eps(name, eps_knob):
    """hf_optim.create_optimizer (the one door of the Trainer, hf-optim train and the sweep): block lr x m_L^(α-1) and
    block eps x m_L^-α with the optimizer's own (resolved) eps; AdamAtan2 has no eps and gets none."""
    model = build("llama", 32, 8, base_depth=2, depth_alpha=0.5)  # m_N = 2, m_L = 4
    knobs = {"eps": 1e-6} if eps_knob else {}
    opt = hf_optim.create_optimizer(name, model, lr=1e-2, **knobs)
    group = {id(p): g for g in opt.param_groups for p in g["params"]}
    q, norm = group[id(model.model.layers[3].self_attn.q_proj.weight)], group[id(model.model.norm.weight)]
    block_norm = group[id(model.model.layers[3].input_layernorm.weight)]
    assert q["lr"] == pytest.approx(1e-2 / 2 * 4**-0.5, rel=1e-12) and block_norm["lr"] == pytest.approx(1e-2 * 0.5)
    assert norm["lr"] == 1e-2
    if eps_knob:
        assert q["eps"] == pytest.approx(1e-6 * 4**-0.5, rel=1e-12) and block_norm["eps"] == q["eps"]
        assert norm["eps"] == 1e-6
    else:
        assert all("eps" not in g for g in opt.param_groups)


def test_mup_param_groups_carry_depth_eps_and_decay():
    model = build("llama", 32, 8, base_depth=2, depth_alpha=0.5)  # m_L = 4: depth lr factor 1/2, eps factor 1/2
    names = {id(p): n for n, p in model.named_parameters()}
    lr, wd, eps = 1e-2, 1e-4, 1e-8
    for group in mi.mup_param_groups(model, lr=lr, weight_decay=wd, eps=eps):
        for p in group["params"]:
            name = names[id(p)]
            block, hidden = ".layers." in name, ".layers." in name and p.dim() == 2
            group_lr = lr * (0.5 if hidden else 1.0) * (0.5 if block else 1.0)
            assert group["lr"] == pytest.approx(group_lr, rel=1e-14), name
            assert group["eps"] == pytest.approx(eps * 0.5 if block else eps, rel=1e-14), name
            if p.dim() == 1:
                assert group["weight_decay"] == 0.0
            else:  # independent: per-step decay η_t·λ·m_L^(α-1) = lr_t · group weight_decay
                per_step = wd * (0.5 if block else 1.0)
                assert group["weight_decay"] == pytest.approx(per_step / group_lr, rel=1e-12), name


# ---- survival: save/load, deepcopy ------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_depth_plan_survives_save_load_and_deepcopy(tmp_path, arch):
    from transformers import AutoModelForCausalLM

    model = build(arch, 32, 4, base_depth=2, depth_alpha=1.0)
    with torch.no_grad():
        expected = model(IDS).logits
    copied = copy.deepcopy(model)
    assert mi.is_mup_applied(copied) and len(branch_hooks(copied)) == 8
    model.save_pretrained(tmp_path)
    loaded = mi.load_mup_model(str(tmp_path))
    assert mi.get_plan(loaded) == mi.get_plan(model) and mi.is_mup_applied(loaded)
    assert [h.multiplier for h in branch_hooks(loaded)] == [0.5] * 8
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(IDS).logits, expected, rtol=0, atol=0)
        torch.testing.assert_close(copied(IDS).logits, expected, rtol=0, atol=0)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)  # the plan is there, the branch multipliers are not
    assert mi.has_plan(plain) and not mi.is_mup_applied(plain)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mi.param_overrides(plain)
    assert any("not in place" in str(w.message) for w in caught)


def test_is_mup_applied_sees_a_missing_or_extra_branch_hook():
    model = build("llama", 32, 4, base_depth=2, depth_alpha=1.0)
    o_proj = model.model.layers[1].self_attn.o_proj
    key = next(iter(o_proj._forward_hooks))
    hook = o_proj._forward_hooks.pop(key)
    assert not mi.is_mup_applied(model)
    o_proj.register_forward_hook(hook)
    o_proj.register_forward_hook(BranchMultiplier(0.5))
    assert not mi.is_mup_applied(model)
    mi.apply_mup(model, init=False)  # idempotent: back to exactly one hook per branch
    assert mi.is_mup_applied(model) and len(branch_hooks(model)) == 8


# ---- recipes: model.mup.base_depth / depth_alpha ----------------------------------------------------------------
def test_recipe_builds_a_depth_scaled_model():
    from hf_optim.runner import _train_model

    model_cfg = {
        "arch": "gpt2",
        "hidden_size": 32,
        "num_layers": 8,
        "num_heads": 4,
        "intermediate_size": 64,
        "tie_word_embeddings": False,
        "mup": {"base_width": 16, "base_depth": 2, "depth_alpha": 0.5},
    }
    model = _train_model.build_model(model_cfg, vocab_size=64, block_size=32)
    plan = mi.get_plan(model)
    assert (plan.base_depth, plan.depth, plan.depth_alpha, plan.width_mult) == (2, 8, 0.5, 2.0)
    assert mi.is_mup_applied(model) and [h.multiplier for h in branch_hooks(model)] == [0.5] * 16


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["model.mup.base_depth=2"], "Pass both base_depth"),
        (["model.mup.base_depth=2", "model.mup.depth_alpha=2.0"], "depth_alpha must be in [0.5, 1.0]"),
        (["model.mup.base_depth=two", "model.mup.depth_alpha=1.0"], "model.mup.base_depth"),
    ],
)
def test_recipe_depth_mistakes_give_one_line(tmp_path, capsys, argv, expected):
    from hf_optim.runner import train

    out = tmp_path / "out"
    assert train.main(["demo", *argv, "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert not out.exists()
