"""Export a muP model to stock architectures: plain from_pretrained in a fresh interpreter without hf-optim must
compute the muP model's logits (fp32, 1e-5), tied and untied, with and without a residual (depth) multiplier.

The residual multiplier of depth transfer (branch 15) is emulated here by forward hooks on the adapter's branch
outputs and a plan attribute, exactly the contract's ``plan.residual_multiplier``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import tiny_gpt2_config, tiny_llama_config

import mup_integration as mi
from mup_integration import export as ex
from mup_integration.adapters import adapter_for

IDS = (torch.arange(2 * 9).view(2, 9) * 7) % 64

LOADER = textwrap.dedent("""
    import json, sys, torch
    from transformers import AutoModelForCausalLM
    ids = torch.tensor(json.loads(sys.argv[1]))
    out = {}
    for path in sys.argv[3:]:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            out[path] = (type(model).__name__, model(ids).logits)
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("hf_optim", "mup_integration", "recipes"))
    torch.save({"logits": out, "leaked": leaked}, sys.argv[2])
""")


def load_in_fresh_interpreter(paths: list[str], tmp_path) -> dict:
    """Load every path with plain AutoModelForCausalLM in a new Python (HF_OPTIM_DISABLE_AUTOLOAD=1, cwd outside
    the repository, so neither hf_optim nor mup_integration can be imported by accident)."""
    out = tmp_path / "fresh.pt"
    env = {**os.environ, "HF_OPTIM_DISABLE_AUTOLOAD": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    proc = subprocess.run(
        [sys.executable, "-c", LOADER, json.dumps(IDS.tolist()), str(out), *paths],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = torch.load(out, weights_only=True)
    assert result["leaked"] == [], result["leaked"]
    return result["logits"]


def randomize(model, std=0.15, seed=0):
    """Weights far from the muP init (large queries/keys, big readout), so that every multiplier changes the
    logits: a missing factor must show up far above the 1e-5 tolerance."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)
            else:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


class ResidualHook:
    """Multiplies a branch output by r (what depth-muP surgery does before the residual add)."""

    def __init__(self, r: float) -> None:
        self.r = r

    def __call__(self, module, args, output):
        return output * self.r


def with_residual_multiplier(model, r: float, monkeypatch):
    for attn_out, mlp_out in adapter_for(model.config).branch_outputs(model):
        attn_out.register_forward_hook(ResidualHook(r))
        mlp_out.register_forward_hook(ResidualHook(r))
    monkeypatch.setattr(ex, "residual_multiplier", lambda plan: r)
    return model


def llama(tied: bool):
    torch.manual_seed(0)
    cfg = tiny_llama_config(hidden_size=128, tie_word_embeddings=tied, num_key_value_heads=2)
    return randomize(mi.make_mup_model(cfg, base_width=32, output_mult=2.0, attn_mult=1.5))


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


CASES = [(to, tied, r) for to in ("granite", "llama") for tied in (False, True) for r in (1.0, 0.5)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every case exported and saved; then one fresh interpreter loads them all."""
    tmp = tmp_path_factory.mktemp("export")
    mp = pytest.MonkeyPatch()
    refs, paths = {}, []
    try:
        for to, tied, r in CASES:
            model = llama(tied)
            if r != 1.0:
                with_residual_multiplier(model, r, mp)
            path = str(tmp / f"{to}-{'tied' if tied else 'untied'}-{r}")
            ex.export_standard(model, to=to).save_pretrained(path)
            mp.undo()
            refs[(to, tied, r)] = (path, logits(model))
            paths.append(path)
    finally:
        mp.undo()
    return refs, load_in_fresh_interpreter(paths, tmp)


@pytest.mark.parametrize(("to", "tied", "r"), CASES)
def test_exported_checkpoint_loads_without_hf_optim_and_matches(exported, to, tied, r):
    refs, fresh = exported
    path, ref = refs[(to, tied, r)]
    cls_name, got = fresh[path]
    assert cls_name == {"granite": "GraniteForCausalLM", "llama": "LlamaForCausalLM"}[to]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        saved = json.load(f)
    assert "hf_optim_mup" not in saved and "mup" not in saved
    if to == "granite":  # by hand: rho = output_mult / m = 2 / 4; the attention scale 1.5 * sqrt(8) / 32
        assert saved["logits_scaling"] == pytest.approx(2.0) and saved["residual_multiplier"] == r
        assert saved["attention_multiplier"] == pytest.approx(1.5 * 8**0.5 / 32, rel=1e-12)
        assert saved["tie_word_embeddings"] == tied
    else:
        assert saved["tie_word_embeddings"] is False


def test_every_multiplier_matters(monkeypatch):
    """Negative controls: the same weights in the stock LLaMA without the multipliers give other logits, and so
    does an export that forgets the residual multiplier."""
    from transformers import LlamaForCausalLM

    model = llama(tied=False)
    plain = LlamaForCausalLM(model.config).eval()
    plain.load_state_dict(model.state_dict())
    assert (logits(plain) - logits(model)).abs().max() > 1e-2
    with_residual_multiplier(model, 0.5, monkeypatch)
    monkeypatch.setattr(ex, "residual_multiplier", lambda plan: 1.0)
    assert (logits(ex.export_standard(model, "llama")) - logits(model)).abs().max() > 1e-2


def test_llama_fold_by_hand():
    """The folded weights, by hand: lm_head x rho, q_proj x (attention scale / head_dim**-0.5)."""
    model = llama(tied=True)
    out = ex.export_standard(model, to="llama")
    rho, c = 2.0 / 4.0, 1.5 * 8**0.5 / 32 / 32**-0.5
    torch.testing.assert_close(out.lm_head.weight, model.model.embed_tokens.weight * rho, rtol=0, atol=0)
    torch.testing.assert_close(out.model.embed_tokens.weight, model.model.embed_tokens.weight, rtol=0, atol=0)
    q, q0 = out.model.layers[1].self_attn.q_proj.weight, model.model.layers[1].self_attn.q_proj.weight
    torch.testing.assert_close(q, q0 * c, rtol=1e-6, atol=0)
    assert out.lm_head.weight is not out.model.embed_tokens.weight
    assert mi.is_mup_applied(model) and model.lm_head.weight is model.model.embed_tokens.weight  # source unchanged


@pytest.mark.parametrize("arch", ["qwen3", "olmo2", "gpt2"])
def test_native_export_of_families_llama_cannot_hold(arch, monkeypatch):
    from transformers import Olmo2Config, Qwen3Config

    common = {
        "vocab_size": 64,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 64,
    }
    cfg = {
        "qwen3": lambda: Qwen3Config(**common, num_key_value_heads=2, head_dim=32),
        "olmo2": lambda: Olmo2Config(**common),
        "gpt2": lambda: tiny_gpt2_config(
            n_embd=128, bos_token_id=0, eos_token_id=0, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0
        ),
    }[arch]()
    torch.manual_seed(0)
    model = randomize(mi.make_mup_model(cfg, base_width=32, attn_mult=1.5))
    with_residual_multiplier(model, 0.5, monkeypatch)
    out = ex.export_standard(model, to="native")
    assert type(out) is type(model) and not mi.has_plan(out)
    torch.testing.assert_close(logits(out), logits(model), rtol=1e-5, atol=1e-5)
    if arch != "gpt2":
        with pytest.raises(ValueError, match=f"cannot represent model_type='{arch}'.*Use --to native"):
            ex.export_standard(model, to="granite")


def test_refusals():
    from transformers import LlamaForCausalLM, MistralConfig

    cfg = MistralConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        sliding_window=16,
    )
    model = mi.make_mup_model(cfg, base_width=32)
    with pytest.raises(ValueError, match=r"sliding-window attention .sliding_window=16 < max_position_embeddings=64"):
        ex.export_standard(model, to="llama")
    with pytest.raises(ValueError, match=r"to must be one of \['granite', 'llama', 'native'\], got 'gguf'"):
        ex.export_standard(model, to="gguf")
    with pytest.raises(ValueError, match="carries no muP plan"):
        ex.export_standard(LlamaForCausalLM(tiny_llama_config()))


def test_cli_export(tmp_path, capsys):
    from hf_optim.cli import main

    model = llama(tied=True)
    model.save_pretrained(tmp_path / "src")
    (tmp_path / "src" / "tokenizer_config.json").write_text("{}")
    assert main(["export", str(tmp_path / "src"), str(tmp_path / "dst"), "--to", "llama"]) == 0
    out = capsys.readouterr().out
    assert "untied: lm_head = the readout multiplier x a copy of the embedding" in out and "copied" in out
    assert (tmp_path / "dst" / "tokenizer_config.json").exists()
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(tmp_path / "dst")
    torch.testing.assert_close(logits(again), logits(model), rtol=1e-5, atol=1e-5)
    assert main(["export", str(tmp_path / "src"), str(tmp_path / "dst")]) == 2  # DST not empty
    assert "already holds a checkpoint" in capsys.readouterr().err
    plain = tmp_path / "plain"
    AutoModelForCausalLM.from_config(tiny_llama_config()).save_pretrained(plain)
    assert main(["export", str(plain), str(tmp_path / "dst2")]) == 2
    assert "no muP plan" in capsys.readouterr().err


# ---- with a real depth plan (branch h15: plan.residual_multiplier, forward hooks on the branch outputs) ---------
def test_export_with_a_depth_plan(tmp_path):
    """A depth-scaled muP model (4 layers over base depth 2): r = (4/2)^-alpha, by hand 0.5 (alpha 1, CompleteP)
    and 2^-0.5 (alpha 1/2, depth-muP); every export reloads in a fresh interpreter with the same logits."""
    from mup_archs import build as build_arch

    cases, paths = {}, []
    for tied in (False, True):
        torch.manual_seed(0)
        cfg = tiny_llama_config(hidden_size=128, num_layers=4, tie_word_embeddings=tied, num_key_value_heads=2)
        model = randomize(mi.make_mup_model(cfg, base_width=32, base_depth=2, depth_alpha=1.0, output_mult=2.0))
        assert mi.get_plan(model).residual_multiplier == 0.5
        for to in ("granite", "llama", "native"):
            cases[(to, tied)] = (model, ex.export_standard(model, to=to))
    for arch in ("gemma2", "mixtral", "gpt_neox"):
        model = randomize(build_arch(arch, base_depth=1, depth_alpha=0.5), std=0.1)  # 2 layers over 1
        assert mi.get_plan(model).residual_multiplier == pytest.approx(2**-0.5, rel=1e-12)
        cases[("native", arch)] = (model, ex.export_standard(model, to="native"))
    refs = {}
    for key, (model, exported) in cases.items():
        path = str(tmp_path / "-".join(map(str, key)))
        exported.save_pretrained(path)
        refs[path] = logits(model)
        paths.append(path)
        if key[0] == "granite":
            with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
                assert json.load(f)["residual_multiplier"] == 0.5
    fresh = load_in_fresh_interpreter(paths, tmp_path)
    for path in paths:
        torch.testing.assert_close(fresh[path][1], refs[path], rtol=1e-5, atol=1e-5, msg=path)


# ---- every supported architecture with a depth plan (issue 16) -------------------------------------------------
def _llama_family(arch: str, width: int = 128):
    """The LLaMA-family rows and GPT-2 of mup_integration.adapters.ADAPTERS at width 128, 2 layers."""
    from transformers import MistralConfig, Olmo2Config, OlmoConfig, Qwen2Config, Qwen3Config

    common = {
        "vocab_size": 64,
        "hidden_size": width,
        "intermediate_size": 2 * width,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 64,
    }
    return {
        "llama": lambda: tiny_llama_config(hidden_size=width, num_key_value_heads=2),
        "mistral": lambda: MistralConfig(**common, num_key_value_heads=2, sliding_window=None),
        "qwen2": lambda: Qwen2Config(**common, num_key_value_heads=2),
        "qwen3": lambda: Qwen3Config(**common, num_key_value_heads=2, head_dim=32),
        "olmo": lambda: OlmoConfig(**common, pad_token_id=0, bos_token_id=0, eos_token_id=0),
        "olmo2": lambda: Olmo2Config(**common, pad_token_id=0, bos_token_id=0, eos_token_id=0),
        "gpt2": lambda: tiny_gpt2_config(
            n_embd=width, bos_token_id=0, eos_token_id=0, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0
        ),
    }[arch]()


LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2", "gpt2")


def _depth_model(arch: str, tied: bool, alpha: float):
    """A muP model of ``arch`` with 2 layers over base depth 1 (r = 2^-alpha), weights far from the init."""
    from mup_archs import ARCHS, build

    if arch in ARCHS:
        model = build(arch, tied=tied, base_depth=1, depth_alpha=alpha, attn_mult=1.5, output_mult=2.0)
    else:
        cfg = _llama_family(arch)
        cfg._attn_implementation = "eager"
        cfg.tie_word_embeddings = tied
        torch.manual_seed(0)
        model = mi.make_mup_model(cfg, base_width=32, base_depth=1, depth_alpha=alpha, attn_mult=1.5, output_mult=2.0)
    return randomize(model, std=0.1)


def _depth_cases():
    from mup_archs import ARCHS

    out = []
    for arch in (*LLAMA_FAMILY, *ARCHS):
        targets = ("granite", "llama", "native") if arch in ex.LLAMA_LAYOUT else ("native",)
        out += [(arch, to, tied, alpha) for to in targets for tied in (False, True) for alpha in (0.5, 1.0)]
    return out


DEPTH_CASES = _depth_cases()


def _without_branch_multipliers(model):
    """The logits of ``model`` with every depth-muP branch multiplier set to 1 (restored afterwards)."""
    from mup_integration.depth import BranchMultiplier

    hooks = [h for m in model.modules() for h in m._forward_hooks.values() if isinstance(h, BranchMultiplier)]
    assert len(hooks) == 2 * model.config.num_hidden_layers
    saved = [h.multiplier for h in hooks]
    try:
        for h in hooks:
            h.multiplier = 1.0
        return logits(model)
    finally:
        for h, m in zip(hooks, saved, strict=True):
            h.multiplier = m


@pytest.fixture(scope="module")
def depth_exports(tmp_path_factory):
    """Every (architecture, target, tying, alpha) exported and saved; one fresh interpreter loads them all."""
    from mup_integration import depth as dp

    tmp = tmp_path_factory.mktemp("depth")
    refs, models = {}, {}
    for arch, to, tied, alpha in DEPTH_CASES:
        if (arch, tied, alpha) not in models:
            model = _depth_model(arch, tied, alpha)
            plan = mi.get_plan(model)
            assert plan.residual_multiplier == pytest.approx(2**-alpha, rel=1e-12)
            assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
            assert dp.branch_multipliers_ok(model, adapter_for(model.config), plan)
            ref = logits(model)
            # negative control: the same model without r computes other logits, so an export that lost r fails
            assert (_without_branch_multipliers(model) - ref).abs().max() > 1e-2, arch
            models[(arch, tied, alpha)] = (model, ref)
            if arch not in ex.LLAMA_LAYOUT:  # the refusal is the same with a depth plan: the layout, not r
                with pytest.raises(ValueError, match=f"cannot represent model_type='{arch}'.*Use --to native"):
                    ex.export_standard(model, to="granite")
        model, ref = models[(arch, tied, alpha)]
        path = str(tmp / f"{arch}-{to}-{'tied' if tied else 'untied'}-{alpha}")
        ex.export_standard(model, to=to).save_pretrained(path)
        refs[(arch, to, tied, alpha)] = (path, ref, type(model).__name__)
    return refs, load_in_fresh_interpreter([p for p, _, _ in refs.values()], tmp)


@pytest.mark.parametrize(("arch", "to", "tied", "alpha"), DEPTH_CASES)
def test_every_architecture_exports_a_depth_plan(depth_exports, arch, to, tied, alpha):
    """2 layers over base depth 1: r = 2^-alpha (depth-muP 2^-0.5, CompleteP 0.5) on every branch output; every
    export loads with plain from_pretrained in a fresh interpreter and gives the muP model's logits (fp32, 1e-5)."""
    refs, fresh = depth_exports
    path, ref, cls_name = refs[(arch, to, tied, alpha)]
    got_cls, got = fresh[path]
    assert got_cls == {"granite": "GraniteForCausalLM", "llama": "LlamaForCausalLM"}.get(to, cls_name)
    print(f"depth export {arch} --to {to} tied={tied} alpha={alpha}: max |logit diff| {(got - ref).abs().max():.2e}")
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        saved = json.load(f)
    assert "hf_optim_mup" not in saved and "mup" not in saved
    if to == "granite":
        assert saved["residual_multiplier"] == pytest.approx(2**-alpha, rel=1e-12)
        assert saved["tie_word_embeddings"] == tied
    else:
        assert saved["tie_word_embeddings"] is False
