"""One row per architecture: muP builds, its multipliers match values computed by hand, the coordinate check stays
flat under muP (widths 64..512) while SP grows, the native export reloads in a fresh interpreter without hf-optim
with the same logits (with and without a residual multiplier), and the Trainer trains it through --optim adamw_v2.

By hand, for width 128 over base 32 (m = 4), 4 heads (head dim 32, base head dim 8), attn_mult 1.5, output_mult 2:
attention scale = s_SP * 1.5 * sqrt(8 / 32); readout input multiplier 2 / 4; Gemma's embedding normaliser sqrt(32)
(the base width's); a router's input multiplier 1 / 4.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from mup_archs import ARCHS, GEMMA, MOE, VOCAB, build
from test_mup_export import load_in_fresh_interpreter, randomize, with_residual_multiplier

import mup_integration as mi
from mup_integration import coord_check as cc
from mup_integration import export as ex
from mup_integration.adapters import adapter_for

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from train_tiny_clm import RuleDataset


@pytest.mark.parametrize("arch", ARCHS)
def test_builds_and_multipliers_match_the_plan(arch):
    model = build(arch, attn_mult=1.5, output_mult=2.0)
    adapter = adapter_for(model.config)
    plan = mi.get_plan(model)
    assert mi.is_mup_applied(model) and plan.width_mult == 4.0
    attns = adapter.attention_modules(model)
    assert len(attns) == 2
    for attn in attns:
        assert math.isclose(attn.scaling, ARCHS[arch][1] * 1.5 * math.sqrt(8 / 32), rel_tol=1e-12)
    assert mi.surgery.input_multiplier(model.get_output_embeddings()) == 0.5
    kinds = {name: info.kind for name, info in plan.params.items()}
    if arch in GEMMA:
        embed = model.get_input_embeddings()
        assert float(embed.embed_scale) == pytest.approx(math.sqrt(32), rel=1e-6)
        assert model.lm_head.weight is embed.weight  # Gemma ties by default; the tie is kept
        assert torch.count_nonzero(model.model.norm.weight) == 0  # (1 + w) norms start at w = 0
    if arch in MOE:
        layer = model.model.layers[0]
        assert kinds["model.layers.0.mlp.gate.weight"] == "readout"
        assert mi.surgery.input_multiplier(layer.mlp.gate) == 0.25
        gate_up = plan.params["model.layers.0.mlp.experts.gate_up_proj"]
        assert (gate_up.kind, gate_up.fan_in_mult, gate_up.fan_out_mult) == ("hidden", 4.0, 4.0)
        # base expert width: intermediate 256 -> 64, Qwen3-MoE's moe_intermediate 128 -> 32 (x2: gate and up)
        assert gate_up.base_shape == (None, 64 if arch == "qwen3_moe" else 128, 32)
        std = layer.mlp.experts.gate_up_proj.std().item()
        assert std == pytest.approx(0.02 / 2, rel=0.03)  # sigma / sqrt(fan_in_mult)
        assert layer.mlp.gate.weight.std().item() == pytest.approx(0.02, rel=0.1)  # a readout: sigma
    if arch == "phi3":
        assert kinds["model.layers.0.self_attn.qkv_proj.weight"] == "hidden"
    if arch == "gpt_neox":
        assert kinds["gpt_neox.layers.0.attention.query_key_value.weight"] == "hidden"


@pytest.mark.parametrize("arch", ARCHS)
def test_zero_query_zeroes_exactly_the_query(arch):
    """zero_query leaves num_heads * head_dim zero rows in the attention's projections (in a fused one too), and
    those rows are the query: scaling the query then changes nothing, while on a normal model it does."""
    model = build(arch, zero_query=True).eval()
    adapter = adapter_for(model.config)
    attn = adapter.attention_modules(model)[0]
    rows = [m.weight for m in attn.children() if isinstance(m, torch.nn.Linear)]
    zero_rows = sum(int((w == 0).all(dim=1).sum()) for w in rows)
    assert zero_rows == model.config.num_attention_heads * adapter.head_dim(attn)
    ids = torch.arange(10).view(1, 10) % VOCAB
    normal = randomize(build(arch), std=0.1)
    for m, expect_change in ((model, False), (normal, True)):
        with torch.no_grad():
            before = m(ids).logits
            adapter.scale_query(adapter.attention_modules(m)[0], 7.0)
            changed = not torch.allclose(m(ids).logits, before, rtol=1e-6, atol=1e-6)
        assert changed == expect_change


# ---- coordinate check ------------------------------------------------------------------------------------------
WIDTHS = (64, 128, 256, 512)
STEPS = 3


def coord_run(arch: str, parametrization: str, width: int) -> dict[tuple[int, str], float]:
    """Mean |activation| of every projection, branch output and block output per step, 3 Adam steps (lr 3e-3) on
    the same bytes of Tiny Shakespeare at every width (as mup_integration.coord_check does for LLaMA)."""
    from transformers import AutoModelForCausalLM

    cfg = ARCHS[arch][0](width)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg) if parametrization == "sp" else mi.make_mup_model(cfg, base_width=64)
    model.train()
    adapter = adapter_for(model.config)
    watched = {}
    for i, (attn_out, mlp_out) in enumerate(adapter.branch_outputs(model)):
        watched[f"layer{i}.attn"], watched[f"layer{i}.mlp"] = attn_out, mlp_out
    for i, layer in enumerate(adapter.layers(model)):
        watched[f"layer{i}"] = layer
        for name, module in layer.named_modules():  # every projection: post-norms hide SP growth from the branches
            if isinstance(module, torch.nn.Linear):
                watched[f"layer{i}.{name}"] = module
    out, step = {}, [0]

    def hook(name):
        def fn(module, args, output):
            t = output[0] if isinstance(output, tuple) else output
            out[(step[0], name)] = t.detach().abs().double().mean().item()

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in watched.items()]
    opt = cc._optimizer(model, parametrization, 3e-3)
    for step[0], tokens in enumerate(cc._batches(VOCAB, 4, 32, STEPS)):
        loss = model(input_ids=tokens, labels=tokens).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for h in handles:
        h.remove()
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_coordinate_check(arch):
    runs = {(p, w): coord_run(arch, p, w) for p in ("sp", "mup") for w in WIDTHS}
    keys = runs[("mup", 64)].keys()
    worst_mup = max(max(runs[("mup", w)][k] for w in WIDTHS) / min(runs[("mup", w)][k] for w in WIDTHS) for k in keys)
    sp_growth = [runs[("sp", 512)][k] / runs[("sp", 64)][k] for k in keys if k[0] == STEPS - 1]
    print(
        f"{arch}: muP worst spread {worst_mup:.2f}x, SP growth at step {STEPS - 1}: "
        f"min {min(sp_growth):.1f}x max {max(sp_growth):.1f}x"
    )
    assert worst_mup < 2.0
    assert max(sp_growth) > 4.0 and sorted(sp_growth)[len(sp_growth) // 2] > 2.0


# ---- export ------------------------------------------------------------------------------------------------------
IDS = (torch.arange(2 * 9).view(2, 9) * 7) % VOCAB


# every family at its default tying, plus the other tying for one tied-by-default and two untied-by-default ones
EXPORT_CASES = [(arch, None, r) for arch in ARCHS for r in (1.0, 0.5)] + [
    ("gemma", False, 0.5),
    ("phi3", True, 0.5),
    ("mixtral", True, 1.0),
]


@pytest.fixture(scope="module")
def native_exports(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("native")
    mp = pytest.MonkeyPatch()
    refs = {}
    try:
        for arch, tied, r in EXPORT_CASES:
            model = randomize(build(arch, tied=tied, attn_mult=1.5, output_mult=2.0), std=0.1)
            if tied is not None:
                assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied
            if r != 1.0:
                with_residual_multiplier(model, r, mp)
            path = str(tmp / f"{arch}-{tied}-{r}")
            ex.export_standard(model, to="native").save_pretrained(path)
            mp.undo()
            with torch.no_grad():
                refs[(arch, tied, r)] = (path, model(IDS).logits, type(model).__name__)
    finally:
        mp.undo()
    return refs, load_in_fresh_interpreter([p for p, _, _ in refs.values()], tmp)


@pytest.mark.parametrize(("arch", "tied", "r"), EXPORT_CASES)
def test_native_export_round_trip(native_exports, arch, tied, r):
    refs, fresh = native_exports
    path, ref, cls_name = refs[(arch, tied, r)]
    got_cls, got = fresh[path]
    assert got_cls == cls_name
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_llama_and_granite_refuse_these_families(arch):
    model = build(arch)
    for to in ("granite", "llama"):
        with pytest.raises(ValueError, match=f"cannot represent model_type='{arch}'.*Use --to native"):
            ex.export_standard(model, to=to)


# ---- Trainer -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_trainer_trains_with_adamw_v2(tmp_path, arch):
    from transformers import Trainer, TrainingArguments

    model = build(arch)
    lr = 1e-2
    args = TrainingArguments(
        output_dir=str(tmp_path),
        optim="adamw_v2",
        learning_rate=lr,
        max_steps=8,
        per_device_train_batch_size=8,
        lr_scheduler_type="constant",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        logging_steps=4,
    )
    trainer = Trainer(model=model, args=args, train_dataset=RuleDataset(64, 16, VOCAB))
    opt = trainer.create_optimizer()
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    plan = mi.get_plan(model)
    for name, p in model.named_parameters():  # Adam rule by hand: hidden lr / 4, everything else lr
        assert lr_of[id(p)] == pytest.approx(lr / 4 if plan.params[name].kind == "hidden" else lr), name
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters()), "a parameter did not train"


# ---- loading -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_save_and_load_reapplies_the_family_multipliers(tmp_path, arch):
    """Gemma's embedding normaliser and the MoE routers' multipliers are forward changes: a plain from_pretrained
    loses them (is_mup_applied says so), mup_integration.load_mup_model puts them back without re-initialising."""
    from transformers import AutoModelForCausalLM

    model = randomize(build(arch, attn_mult=1.5, output_mult=2.0), std=0.1)
    model.save_pretrained(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert mi.has_plan(plain) and not mi.is_mup_applied(plain)
    loaded = mi.load_mup_model(str(tmp_path)).eval()
    assert mi.is_mup_applied(loaded)
    with torch.no_grad():  # (loading picks sdpa attention, the built model eager: rounding differs)
        torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits, rtol=1e-5, atol=1e-5)
    if arch in GEMMA or arch in MOE:  # only the family's own multiplier is missing after the plain load
        mi.apply_mup(plain, init=False)
        if arch in GEMMA:
            plain.get_input_embeddings().embed_scale.fill_(float(plain.config.hidden_size) ** 0.5)
        else:
            mi.surgery.set_input_multiplier(plain.model.layers[0].mlp.gate, None)
        assert not mi.is_mup_applied(plain)
