"""muP plan + surgery: kinds and multipliers from configs, the surgery's formulas, survival through model transforms."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import warnings

import pytest
import torch
from conftest import tiny_gpt2_config, tiny_llama_config

import mup_integration as mi
from mup_integration.hooks import ReadoutMultiplier


def llama_cfg(width: int, **kw):
    return tiny_llama_config(hidden_size=width, **kw)


@pytest.fixture(scope="module")
def mup_llama():
    torch.manual_seed(0)
    return mi.make_mup_model(llama_cfg(128), base_width=32)


def overrides_by_name(model, **kw):
    ov = mi.param_overrides(model, **kw)
    return {name: ov[p] for name, p in model.named_parameters()}


# ---- plan ------------------------------------------------------------------------------------------------------
def test_llama_plan_kinds_and_multipliers():
    # target 128 wide, MLP 384 (base MLP given as 48: ratio 8, differs from the hidden ratio 4)
    plan = mi.make_plan(llama_cfg(128, intermediate_size=384), base_width=32, base_intermediate_size=48)
    p = plan.params
    assert p["model.embed_tokens.weight"].kind == "embedding" and p["model.embed_tokens.weight"].width_mult == 4
    assert p["lm_head.weight"].kind == "readout" and p["lm_head.weight"].width_mult == 4
    q = p["model.layers.0.self_attn.q_proj.weight"]
    assert (q.kind, q.fan_in_mult, q.fan_out_mult) == ("hidden", 4, 4)
    up, down = p["model.layers.1.mlp.up_proj.weight"], p["model.layers.1.mlp.down_proj.weight"]
    assert (up.fan_in_mult, up.fan_out_mult, up.width_mult) == (4, 8, 4)  # (out=384, in=128) / (48, 32)
    assert (down.fan_in_mult, down.fan_out_mult, down.width_mult) == (8, 4, 8)
    assert p["model.norm.weight"].kind == "vector" and p["model.norm.weight"].base_shape == (32,)
    assert p["lm_head.weight"].base_shape == (None, 32)  # vocab is not a width dim
    assert plan.width_mult == 4 and plan.head_dim == 32 and plan.base_head_dim == 8
    assert len(p) == 2 * 9 + 3


def test_gpt2_conv1d_fan_in_is_dim0():
    plan = mi.make_plan(tiny_gpt2_config(n_embd=128, n_inner=1024), base_width=32, base_intermediate_size=64)
    fc, proj = plan.params["transformer.h.0.mlp.c_fc.weight"], plan.params["transformer.h.0.mlp.c_proj.weight"]
    assert fc.shape == (128, 1024) and (fc.fan_in_mult, fc.fan_out_mult) == (4, 16)
    assert proj.shape == (1024, 128) and (proj.fan_in_mult, proj.fan_out_mult) == (16, 4)
    assert plan.params["transformer.wpe.weight"].kind == "embedding"
    assert plan.params["transformer.h.0.attn.c_attn.bias"].kind == "vector"
    assert "lm_head.weight" not in plan.params  # tied: the readout is the embedding


def test_plan_is_json_and_round_trips():
    plan = mi.make_plan(llama_cfg(64), base_width=32, output_mult=2.0, attn_mult=0.5, zero_query=True)
    again = mi.MuPPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan


def test_base_equal_to_target_gives_unit_multipliers():
    plan = mi.make_plan(llama_cfg(32), base_width=32)
    assert all(i.fan_in_mult == i.fan_out_mult == 1.0 for i in plan.params.values())
    # width dims are still known (from the internal 2x "delta" model), as mup needs a delta model for
    assert plan.params["model.layers.0.self_attn.q_proj.weight"].base_shape == (32, 32)


def test_explicit_base_config_with_fixed_head_dim():
    target = llama_cfg(128, num_attention_heads=8, num_key_value_heads=8)  # head_dim 16
    base = llama_cfg(32, num_attention_heads=2, num_key_value_heads=2)  # head_dim 16
    plan = mi.make_plan(target, base)
    assert plan.head_dim == plan.base_head_dim == 16
    derived = mi.make_plan(target, base_width=32, base_head_dim=16)
    assert derived.params == plan.params


# ---- clear errors ---------------------------------------------------------------------------------------------
def test_unknown_model_type_is_rejected():
    from transformers import OPTConfig

    with pytest.raises(ValueError, match=r"model_type='opt'.*Supported"):
        mi.make_plan(OPTConfig(hidden_size=64, num_attention_heads=4, ffn_dim=128), base_width=32)


def test_base_wider_than_target_is_rejected():
    with pytest.raises(ValueError, match="base is wider"):
        mi.make_plan(llama_cfg(32), base_width=64)
    with pytest.raises(ValueError, match="base is wider"):
        mi.make_plan(llama_cfg(32), llama_cfg(64))


def test_base_and_width_arguments_are_exclusive():
    with pytest.raises(ValueError, match="exactly one of base_config"):
        mi.make_plan(llama_cfg(64))


def test_non_width_dim_change_is_rejected():
    with pytest.raises(ValueError, match="does not scale with the width"):
        mi.make_plan(llama_cfg(64), llama_cfg(32, vocab_size=128))


def test_plan_for_another_model_is_rejected(mup_llama):
    from transformers import LlamaForCausalLM

    other = LlamaForCausalLM(llama_cfg(128, num_layers=3))
    with pytest.raises(ValueError, match=r"does not match the model's parameters.*not in the plan"):
        mi.param_overrides(other, plan=mi.get_plan(mup_llama))
    wrong_width = LlamaForCausalLM(llama_cfg(64))
    with pytest.raises(ValueError, match="shape mismatch"):
        mi.apply_mup(wrong_width, mi.get_plan(mup_llama))


def test_model_without_plan_is_rejected(tiny_llama):
    with pytest.raises(ValueError, match="carries no muP plan"):
        mi.param_overrides(tiny_llama)


# ---- surgery formulas -----------------------------------------------------------------------------------------
def test_attention_scale_is_one_over_d_anchored_at_base():
    model = mi.make_mup_model(llama_cfg(128), base_width=32, attn_mult=1.5)  # d = 32, d0 = 8
    for layer in model.model.layers:
        assert math.isclose(layer.self_attn.scaling, 1.5 * math.sqrt(8) / 32, rel_tol=1e-12)
    base = mi.make_mup_model(llama_cfg(32), base_width=32)
    assert math.isclose(base.model.layers[0].self_attn.scaling, 8**-0.5, rel_tol=1e-12)  # = SP at the base


def test_gpt2_attention_scale_keeps_inverse_layer_idx():
    cfg = tiny_gpt2_config(n_embd=128, scale_attn_by_inverse_layer_idx=True)  # d = 32, base d0 = 8
    model = mi.make_mup_model(cfg, base_width=32)
    for i, block in enumerate(model.transformer.h):
        assert math.isclose(block.attn.scaling, math.sqrt(8) / 32 / (i + 1), rel_tol=1e-12)


@pytest.mark.parametrize("tied", [False, True])
def test_readout_multiplier_in_forward(tied):
    torch.manual_seed(0)
    model = mi.make_mup_model(llama_cfg(128, tie_word_embeddings=tied), base_width=32, output_mult=3.0)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    ids = torch.randint(0, 64, (2, 7))
    out = model(ids, output_hidden_states=True)
    h = out.hidden_states[-1].double()  # after the final norm
    expected = (h * 3.0 / 4.0) @ model.lm_head.weight.double().T
    torch.testing.assert_close(out.logits.double(), expected, rtol=1e-5, atol=1e-6)


def test_mup_init_statistics():
    torch.manual_seed(0)
    cfg = llama_cfg(256, vocab_size=512)
    model = mi.make_mup_model(cfg, base_width=32)  # width_mult 8
    sigma = cfg.initializer_range
    q = model.model.layers[0].self_attn.q_proj.weight
    down = model.model.layers[0].mlp.down_proj.weight
    assert q.std().item() == pytest.approx(sigma / math.sqrt(8), rel=0.03)
    assert down.std().item() == pytest.approx(sigma / math.sqrt(8), rel=0.03)
    assert model.model.embed_tokens.weight.std().item() == pytest.approx(sigma, rel=0.03)
    assert model.lm_head.weight.std().item() == pytest.approx(sigma, rel=0.03)
    assert torch.equal(model.model.norm.weight, torch.ones(256))


def test_gpt2_init_keeps_residual_scaling():
    torch.manual_seed(0)
    cfg = tiny_gpt2_config(n_embd=256, n_layer=2)
    model = mi.make_mup_model(cfg, base_width=64)  # width_mult 4
    sigma = cfg.initializer_range
    proj = model.transformer.h[0].attn.c_proj.weight
    assert proj.std().item() == pytest.approx(sigma / math.sqrt(4) / math.sqrt(4), rel=0.03)  # /sqrt(2L), /sqrt(m)
    assert model.transformer.h[0].mlp.c_fc.weight.std().item() == pytest.approx(sigma / 2, rel=0.03)
    assert torch.count_nonzero(model.transformer.h[0].attn.c_attn.bias) == 0


def test_zero_readout_and_zero_query():
    model = mi.make_mup_model(llama_cfg(64), base_width=32, zero_readout=True, zero_query=True)
    assert torch.count_nonzero(model.lm_head.weight) == 0
    assert all(torch.count_nonzero(layer.self_attn.q_proj.weight) == 0 for layer in model.model.layers)
    assert torch.count_nonzero(model.model.layers[0].self_attn.k_proj.weight) > 0
    gpt = mi.make_mup_model(tiny_gpt2_config(n_embd=64), base_width=32, zero_query=True)
    w = gpt.transformer.h[0].attn.c_attn.weight
    assert torch.count_nonzero(w[:, :64]) == 0 and torch.count_nonzero(w[:, 64:]) == w[:, 64:].numel()
    with pytest.raises(ValueError, match="zero_readout=True needs untied"):
        mi.make_mup_model(llama_cfg(64, tie_word_embeddings=True), base_width=32, zero_readout=True)


def test_apply_is_idempotent_and_init_false_keeps_weights(mup_llama):
    model = copy.deepcopy(mup_llama)
    before = {k: t.clone() for k, t in model.state_dict().items()}
    mi.apply_mup(model, init=False)
    mi.apply_mup(model, init=False)
    hooks = [h for h in model.lm_head._forward_pre_hooks.values() if isinstance(h, ReadoutMultiplier)]
    assert len(hooks) == 1 and hooks[0].multiplier == 0.25
    assert all(torch.equal(before[k], t) for k, t in model.state_dict().items())


# ---- survival -------------------------------------------------------------------------------------------------
def _same_forward(a, b):
    ids = torch.arange(12).view(2, 6) % 64
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits, rtol=0, atol=0)


def test_survives_deepcopy(mup_llama):
    clone = copy.deepcopy(mup_llama)
    assert mi.is_mup_applied(clone)
    assert overrides_by_name(clone) == overrides_by_name(mup_llama)
    assert set(map(id, mi.param_overrides(clone))) == {id(p) for p in clone.parameters()}
    _same_forward(clone, mup_llama)


def test_survives_meta_construction_and_to_empty():
    cfg = llama_cfg(128)
    model = mi.make_mup_model(cfg, base_width=32, device="meta")
    assert model.lm_head.weight.is_meta and mi.is_mup_applied(model)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    mi.init_weights(model)
    assert model.model.layers[0].mlp.up_proj.weight.std().item() == pytest.approx(0.02 / 2, rel=0.05)
    assert torch.equal(model.model.norm.weight, torch.ones(128))
    ov = overrides_by_name(model)
    assert ov["model.layers.0.mlp.up_proj.weight"]["lr_mult"] == 0.25


def test_survives_load_state_dict_assign(mup_llama):
    fresh = mi.make_mup_model(llama_cfg(128), base_width=32)
    old = list(fresh.parameters())
    fresh.load_state_dict(mup_llama.state_dict(), assign=True)  # replaces every Parameter object
    assert all(new is not prev for new, prev in zip(fresh.parameters(), old))
    ov = mi.param_overrides(fresh)
    assert set(map(id, ov)) == {id(p) for p in fresh.parameters()}
    assert overrides_by_name(fresh) == overrides_by_name(mup_llama)
    _same_forward(fresh, mup_llama)


def test_survives_torch_compile_names(mup_llama):
    compiled = torch.compile(mup_llama, backend="eager")
    names = [n for n, _ in compiled.named_parameters()]
    assert all(n.startswith("_orig_mod.") for n in names)
    ov = mi.param_overrides(compiled)
    assert {id(p): o for p, o in ov.items()} == {id(p): o for p, o in mi.param_overrides(mup_llama).items()}
    assert mi.is_mup_applied(compiled)


def test_module_prefix_names_resolve(mup_llama):
    plan = mi.get_plan(mup_llama)
    wrapped = [(f"module.{n}", p) for n, p in mup_llama.named_parameters()]
    assert len(plan.match(wrapped)) == len(plan.params)
    assert plan.resolve("module._orig_mod.lm_head.weight") == "lm_head.weight"


def test_save_and_from_pretrained(tmp_path, mup_llama):
    from transformers import LlamaForCausalLM

    mup_llama.save_pretrained(tmp_path)
    loaded = mi.from_pretrained(LlamaForCausalLM, str(tmp_path))
    assert mi.get_plan(loaded) == mi.get_plan(mup_llama) and mi.is_mup_applied(loaded)
    for (n, a), (_, b) in zip(loaded.state_dict().items(), mup_llama.state_dict().items()):
        assert torch.equal(a, b), n  # loading must not re-initialise
    _same_forward(loaded, mup_llama)
    auto = mi.load_mup_model(str(tmp_path))
    _same_forward(auto, mup_llama)
    plain = LlamaForCausalLM.from_pretrained(tmp_path)  # the plan is there, the surgery is not
    assert mi.has_plan(plain) and not mi.is_mup_applied(plain)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mi.param_overrides(plain)
    assert any("not in place" in str(w.message) for w in caught)


# ---- the forward really uses the surgery (eager and sdpa attention, LLaMA and GPT-2) ----------------------------
@pytest.mark.parametrize("attn_impl", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_surgery_with_sp_constants_equals_the_sp_forward(arch, attn_impl):
    """output_mult = m and attn_mult = sqrt(d/d0) undo both forward changes, so the muP model must compute exactly
    what the unmodified HF model computes with the same weights; attn_mult = 1 must not."""
    from transformers import AutoModelForCausalLM

    cfg = (
        llama_cfg(128)
        if arch == "llama"
        else tiny_gpt2_config(n_embd=128, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    )  # m = 4, d = 32, d0 = 8
    cfg._attn_implementation = attn_impl
    torch.manual_seed(0)
    undo = mi.make_mup_model(cfg, base_width=32, output_mult=4.0, attn_mult=2.0).eval()
    sp = AutoModelForCausalLM.from_config(cfg).eval()
    sp.load_state_dict(undo.state_dict())
    ids = torch.arange(14).view(2, 7) % 64
    with torch.no_grad():
        torch.testing.assert_close(undo(ids).logits, sp(ids).logits, rtol=1e-5, atol=1e-6)
        mup_model = copy.deepcopy(undo)
        mi.apply_mup(mup_model, dataclasses.replace(mi.get_plan(undo), output_mult=4.0, attn_mult=1.0), init=False)
        assert not torch.allclose(mup_model(ids).logits, sp(ids).logits, rtol=1e-3, atol=1e-4)


def test_gpt2_tied_readout_multiplier():
    torch.manual_seed(0)
    model = mi.make_mup_model(tiny_gpt2_config(n_embd=128), base_width=32, output_mult=2.0).eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    ids = torch.arange(10).view(2, 5)
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    expected = (out.hidden_states[-1].double() * 2.0 / 4.0) @ model.transformer.wte.weight.double().T
    torch.testing.assert_close(out.logits.double(), expected, rtol=1e-5, atol=1e-6)


def test_apply_mup_rejects_an_unknown_model_type(mup_llama):
    from transformers import OPTConfig, OPTForCausalLM

    other = OPTForCausalLM(
        OPTConfig(
            hidden_size=32,
            num_attention_heads=4,
            ffn_dim=64,
            num_hidden_layers=1,
            vocab_size=64,
            word_embed_proj_dim=32,
        )
    )
    with pytest.raises(ValueError, match=r"model_type='opt'.*Supported"):
        mi.apply_mup(other, mi.get_plan(mup_llama))


def test_compiled_forward_keeps_the_surgery(mup_llama):
    compiled = torch.compile(copy.deepcopy(mup_llama), backend="eager")  # dynamo traces the readout pre-hook
    _same_forward(compiled, mup_llama)
