"""Where the plan is stored (config.hf_optim_mup), old config.mup dicts, and upstream transformers' `mup: true`.

transformers pull request 45848 (not released) reads a truthy ``config.mup`` as "apply upstream muP"; see
mup_integration/storage.py for the table these tests check.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_llama_config

import mup_integration as mi


def _model(width=64, base=32, **kw):
    torch.manual_seed(0)
    return mi.make_mup_model(tiny_llama_config(hidden_size=width, **kw), base_width=base)


def _logits(model, ids=None):
    ids = torch.arange(12).view(2, 6) % 64 if ids is None else ids
    with torch.no_grad():
        return model(ids).logits


def _old_style_checkpoint(tmp_path, model, **extra):
    """Rewrite a saved config.json the way the previous version wrote it: the plan under "mup"."""
    model.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    cfg = json.loads(path.read_text())
    cfg["mup"] = cfg.pop("hf_optim_mup")
    cfg.update(extra)
    path.write_text(json.dumps(cfg))
    return cfg


def test_plan_is_stored_under_a_key_upstream_does_not_claim(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert "mup" not in cfg and "mup_base_width" not in cfg
    assert cfg["hf_optim_mup"]["width_mult"] == 2.0 and "params" in cfg["hf_optim_mup"]


def test_old_config_mup_dict_still_loads_and_moves_to_the_new_key(tmp_path):
    model = _model()
    _old_style_checkpoint(tmp_path, model)
    loaded = mi.load_mup_model(str(tmp_path))
    assert mi.is_mup_applied(loaded) and mi.get_plan(loaded) == mi.get_plan(model)
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=0)
    # re-saved, the checkpoint no longer carries a `mup` key that upstream would read as "muP on"
    loaded.save_pretrained(tmp_path / "again")
    cfg = json.loads((tmp_path / "again" / "config.json").read_text())
    assert "mup" not in cfg and cfg["hf_optim_mup"]["width_mult"] == 2.0


def test_old_plan_with_a_matching_upstream_base_width_is_the_plan(tmp_path):
    model = _model(width=128, base=32)
    _old_style_checkpoint(tmp_path, model, mup_base_width=32)
    loaded = mi.load_mup_model(str(tmp_path))
    assert mi.get_plan(loaded).width_mult == 4.0
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=0)


def test_old_plan_with_a_disagreeing_upstream_base_width_is_refused(tmp_path):
    model = _model(width=128, base=32)
    _old_style_checkpoint(tmp_path, model, mup_base_width=64)
    with pytest.raises(ValueError, match=r"base hidden size 32\) and upstream's mup_base_width=64, which disagree"):
        mi.load_mup_model(str(tmp_path))


def _upstream_model(**fields):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = tiny_llama_config(hidden_size=64)
    for k, v in fields.items():
        setattr(config, k, v)
    return LlamaForCausalLM(config)


def test_upstream_mup_switch_on_an_existing_model_is_refused_everywhere():
    model = _upstream_model(mup=True, mup_base_width=32)
    for call in (mi.has_plan, mi.get_plan, lambda m: mi.apply_mup(m, init=False), mi.param_overrides):
        with pytest.raises(ValueError, match=r"config.mup=True \(mup_base_width=32\) is the muP switch of upstream"):
            call(model)
    plan = mi.make_plan(tiny_llama_config(hidden_size=64), base_width=32)
    before = {k: t.clone() for k, t in model.state_dict().items()}
    with pytest.raises(ValueError, match="muP switch of upstream"):
        mi.apply_mup(model, plan)  # an explicit plan does not bypass the check, and nothing was changed
    assert not model.lm_head._forward_pre_hooks
    assert all(torch.equal(before[k], t) for k, t in model.state_dict().items())


def test_both_plans_on_one_config_are_refused():
    model = _model()
    model.config.mup = True
    model.config.mup_base_width = 32
    with pytest.raises(ValueError, match=r"both an hf-optim muP plan.*and upstream's muP switch"):
        mi.get_plan(model)


def test_trainer_refuses_upstream_mup_unless_opted_out(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = _upstream_model(mup=True, mup_base_width=32)

    def args(optim_args=None):
        return TrainingArguments(
            output_dir=str(tmp_path), optim="adamw_v2", optim_args=optim_args, report_to="none", use_cpu=True
        )

    with pytest.raises(ValueError, match=r"muP switch of upstream.*mup=false"):
        Trainer.get_optimizer_cls_and_kwargs(args(), model)
    _, kwargs = Trainer.get_optimizer_cls_and_kwargs(args("mup=false"), model)
    assert "param_overrides" not in kwargs


def test_make_mup_model_adopts_upstream_base_width():
    config = tiny_llama_config(hidden_size=128)
    config.mup, config.mup_base_width = True, 32
    model = mi.make_mup_model(config, output_mult=2.0)
    plan = mi.get_plan(model)
    # by hand: base width 32 -> width_mult 128/32; head dim 32 -> base head dim 8 (4 heads kept)
    assert plan.width_mult == 4.0 and (plan.head_dim, plan.base_head_dim) == (32, 8)
    assert plan.params["model.layers.0.mlp.up_proj.weight"].fan_in_mult == 4.0
    assert not hasattr(model.config, "mup") and not hasattr(model.config, "mup_base_width")
    assert config.mup is True  # the caller's config is not modified
    assert mi.is_mup_applied(model)
    with pytest.raises(ValueError, match="base_width=64 disagrees with the config's mup_base_width=32"):
        mi.make_mup_model(config, base_width=64)
    del config.mup_base_width
    with pytest.raises(ValueError, match="mup_base_width is not: pass base_width="):
        mi.make_mup_model(config)
