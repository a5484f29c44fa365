"""Interop with microsoft/mup 1.0.0: infshapes -> plan, and .bsh files both ways."""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import tiny_gpt2_config, tiny_llama_config

import mup_integration as mi

mup = pytest.importorskip("mup")


def _llama(width: int, **kw):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(hidden_size=width, **kw))


def test_infshapes_become_the_same_plan_as_make_plan():
    cfg = tiny_llama_config(hidden_size=128)
    model = _llama(128)
    mup.set_base_shapes(model, _llama(32), rescale_params=False, do_assert=False)
    from_mup = mi.plan_from_infshapes(model)
    ours = mi.make_plan(cfg, base_width=32)
    assert from_mup.params == ours.params
    assert (from_mup.width_mult, from_mup.head_dim, from_mup.base_head_dim) == (4.0, 32, 8)
    # the plan outlives the attribute: after deepcopy mup's infshape is gone, the plan (by name) still applies
    import copy

    clone = copy.deepcopy(model)
    assert not hasattr(next(clone.parameters()), "infshape")
    mi.apply_mup(clone, from_mup, init=False)
    assert mi.is_mup_applied(clone) and len(mi.param_overrides(clone)) == len(ours.params)


def test_missing_infshape_is_a_clear_error():
    with pytest.raises(ValueError, match=r"no `infshape` attribute.*set_base_shapes"):
        mi.plan_from_infshapes(_llama(64))


def test_bsh_written_by_us_is_read_by_mup(tmp_path):
    cfg = tiny_llama_config(hidden_size=128)
    plan = mi.make_plan(cfg, base_width=32)
    path = tmp_path / "llama.bsh"
    mi.save_base_shapes(plan, path)
    model = _llama(128)
    mup.set_base_shapes(model, str(path), rescale_params=False, do_assert=False)
    q = model.model.layers[0].self_attn.q_proj.weight
    assert q.infshape.ninf() == 2 and q.infshape.width_mult() == 4.0
    assert model.lm_head.weight.infshape.ninf() == 1
    assert mi.plan_from_infshapes(model).params == plan.params


def test_bsh_written_by_mup_is_read_by_us(tmp_path):
    path = tmp_path / "gpt2.bsh"
    from transformers import GPT2LMHeadModel

    base, delta = (GPT2LMHeadModel(tiny_gpt2_config(n_embd=w)) for w in (32, 64))
    mup.make_base_shapes(base, delta, savefile=str(path))
    raw = yaml.safe_load(path.read_text())
    assert raw["transformer.h.0.attn.c_attn.weight"] == [32, 96]
    target = GPT2LMHeadModel(tiny_gpt2_config(n_embd=128))
    plan = mi.plan_from_base_shapes(target, path)
    assert plan.params == mi.make_plan(tiny_gpt2_config(n_embd=128), base_width=32).params


def test_bad_bsh_files(tmp_path):
    bad = tmp_path / "bad.bsh"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="expected a YAML mapping"):
        mi.load_base_shapes(bad)
    bad.write_text("w: [32, -1]\n")
    with pytest.raises(ValueError, match="positive ints or null"):
        mi.load_base_shapes(bad)
    bad.write_text("w: [32]\n")
    with pytest.raises(ValueError, match="do not match the model's parameters"):
        mi.plan_from_base_shapes(_llama(32), bad)


def test_a_mup_readout_head_is_not_given_a_second_multiplier():
    # A model prepared for mup carries mup's MuReadout (which already divides by width_mult): apply_mup refuses,
    # and the plan still reaches the optimizer through param_overrides(plan=...).
    model = _llama(128)
    head = model.lm_head
    model.lm_head = mup.MuReadout(head.in_features, head.out_features, bias=False)
    mup.set_base_shapes(model, _llama(32), rescale_params=False, do_assert=False)
    plan = mi.plan_from_infshapes(model)
    with pytest.raises(ValueError, match=r"mup's MuReadout.*second time.*plan_from_infshapes"):
        mi.apply_mup(model, plan, init=False)
    overrides = mi.param_overrides(model, plan=plan)
    assert overrides[model.model.layers[0].mlp.up_proj.weight]["lr_mult"] == pytest.approx(1 / 4)
