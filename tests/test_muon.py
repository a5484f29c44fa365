"""Muon (issue 25): against torch.optim.Muon, the exact SVD direction and its 0.2·lr RMS, every decay mode against a
float64 formula, per-matrix 3-D orthogonalisation, routing of LLaMA / GPT-2 parameters, one state dict for both
rules (round trip, continue == uninterrupted, Trainer), muP's rule and the errors raised before any step."""

from __future__ import annotations

import copy
import io
import math
import sys
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

import hf_optim
from hf_optim.optim.muon import orthogonalize as ortho
from hf_optim.optim.muon.optimizer import Muon

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_llama_config

SHAPES = [(8, 5), (5, 8), (6, 6)]


def _grads(shapes, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g) for s in shapes] for _ in range(steps)]


def _run(opt, params, grads):
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g.clone()
        opt.step()


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize(("adjust", "torch_adjust"), [("original", None), ("rms", "match_rms_adamw")])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_matches_torch_muon_over_20_steps(adjust, torch_adjust, nesterov, weight_decay):
    torch.manual_seed(0)
    init = [torch.randn(s) for s in SHAPES]
    ours = [torch.nn.Parameter(x.clone()) for x in init]
    ref = [torch.nn.Parameter(x.clone()) for x in init]
    grads = _grads(SHAPES, 20)
    kw = dict(lr=0.02, momentum=0.95, nesterov=nesterov, weight_decay=weight_decay)
    _run(Muon(ours, adjust=adjust, rule="muon", **kw), ours, grads)
    _run(torch.optim.Muon(ref, adjust_lr_fn=torch_adjust, **kw), ref, grads)
    for a, b in zip(ours, ref):
        # same bf16 Newton-Schulz: equal up to bf16 rounding of the iteration (2^-8 relative, of an O(lr) step)
        torch.testing.assert_close(a, b, rtol=0, atol=20 * 0.02 * 2**-8)


@pytest.mark.parametrize("shape", [(16, 8), (8, 24), (3, 8, 4), (12, 12)])
def test_svd_update_has_rms_0_2_lr_under_rms_adjust(shape):
    torch.manual_seed(1)
    p = torch.nn.Parameter(torch.randn(shape, dtype=torch.float64))
    before = p.detach().clone()
    lr = 0.01
    opt = Muon([p], lr=lr, adjust="rms", orthogonalize="svd", weight_decay=0.0, momentum=0.9, rule="muon")
    p.grad = torch.randn(shape, dtype=torch.float64)
    opt.step()
    rms = (p.detach() - before).pow(2).mean().sqrt().item()
    # U V^T of an A x B matrix has RMS 1/sqrt(max(A, B)); 0.2·sqrt(max(A, B)) makes it 0.2 (times lr)
    assert rms == pytest.approx(0.2 * lr, abs=1e-5 * lr)


def _expected_step(x, g, lr, lr_peak, mode, wd, adjust):
    """One first step of Muon written out in float64: B = (1-mu) g, nesterov D = mu B + (1-mu) g, O = U V^T."""
    mu = 0.9
    g = g + wd * x if mode == "l2" else g
    buf = (1 - mu) * g
    d = mu * buf + (1 - mu) * g
    u, _, vh = torch.linalg.svd(d, full_matrices=False)
    o = u @ vh
    rows, cols = x.shape
    scale = {"original": math.sqrt(max(1, rows / cols)), "rms": 0.2 * math.sqrt(max(rows, cols))}.get(
        adjust, math.sqrt(rows / cols)
    )
    rate = {"l2": 0.0, "coupled": lr * wd, "independent": lr / lr_peak * wd, "corrected": lr**2 / lr_peak * wd}[mode]
    return x * (1 - rate) - lr * scale * o


@pytest.mark.filterwarnings("ignore:weight_decay=0.3 with weight_decay_mode='independent'")
@pytest.mark.parametrize("mode", ["l2", "coupled", "independent", "corrected"])
@pytest.mark.parametrize("adjust", ["original", "rms", "spectral"])
def test_decay_modes_and_adjust_against_float64(mode, adjust):
    torch.manual_seed(2)
    x = torch.randn(7, 4, dtype=torch.float64)
    g = torch.randn(7, 4, dtype=torch.float64)
    p = torch.nn.Parameter(x.clone())
    lr_peak, lr = 0.05, 0.02  # a scheduler at 40 % of the peak
    opt = Muon([p], lr=lr_peak, momentum=0.9, weight_decay=0.3, weight_decay_mode=mode, adjust=adjust)
    opt.param_groups[0]["lr"] = lr
    opt.param_groups[0]["orthogonalize"] = "svd"
    p.grad = g.clone()
    opt.step()
    torch.testing.assert_close(p.detach(), _expected_step(x, g, lr, lr_peak, mode, 0.3, adjust), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["svd", "newton_schulz"])
def test_3d_parameters_are_orthogonalised_per_matrix(method):
    torch.manual_seed(3)
    stacked = torch.randn(4, 6, 3)
    out = ortho.orthogonalize(
        stacked, method=method, steps=5, coefficients=ortho.NS_COEFFICIENTS, eps=1e-7, dtype=torch.float32
    )
    for i in range(4):
        alone = ortho.orthogonalize(
            stacked[i], method=method, steps=5, coefficients=ortho.NS_COEFFICIENTS, eps=1e-7, dtype=torch.float32
        )
        torch.testing.assert_close(out[i], alone, rtol=1e-5, atol=1e-6)
    if method == "svd":  # semi-orthogonal: all singular values 1
        torch.testing.assert_close(torch.linalg.svdvals(out.double()), torch.ones(4, 3, dtype=torch.float64))


def test_newton_schulz_pushes_singular_values_near_one():
    torch.manual_seed(4)
    g = torch.randn(32, 16) @ torch.diag(torch.logspace(-1, 0, 16))  # condition number ~10
    s = torch.linalg.svdvals(
        ortho.orthogonalize(
            g, method="newton_schulz", steps=5, coefficients=ortho.NS_COEFFICIENTS, eps=1e-7, dtype=torch.float32
        )
    )
    assert s.min() > 0.5 and s.max() < 1.3  # Keller Jordan's quintic: roughly U(0.7, 1.2), not exactly 1


def _rules(model, opt):
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: g["rule"] for g in opt.param_groups for p in g["params"]}


def test_routing_llama_and_gpt2():
    torch.manual_seed(0)
    llama = LlamaForCausalLM(tiny_llama_config())
    got = _rules(llama, hf_optim.create_optimizer("muon_v2", llama, lr=0.02))
    for name, param in llama.named_parameters():
        hidden = param.dim() == 2 and name not in ("model.embed_tokens.weight", "lm_head.weight")
        assert got[name] == ("muon" if hidden else "fallback"), name
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32))
    got = _rules(gpt2, hf_optim.create_optimizer("muon_v2", gpt2, lr=0.02))
    for name, param in gpt2.named_parameters():  # lm_head is tied to wte: one tensor, listed once
        hidden = param.dim() == 2 and name not in ("transformer.wte.weight", "transformer.wpe.weight")
        assert got[name] == ("muon" if hidden else "fallback"), name
    assert sum(v == "muon" for v in got.values()) == 2 * 4  # c_attn, c_proj, c_fc, mlp.c_proj per block


def test_user_rule_routes_a_matrix_to_the_fallback(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    rules = [{"match": r"o_proj", "optimizer": "fallback", "lr_mult": 0.5}]
    opt = hf_optim.create_optimizer("muon_v2", model, lr=0.02, groups=rules)
    got = _rules(model, opt)
    assert got["model.layers.1.self_attn.o_proj.weight"] == "fallback"
    assert got["model.layers.1.self_attn.q_proj.weight"] == "muon"
    lr = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lr[id(model.model.layers[1].self_attn.o_proj.weight)] == pytest.approx(0.01)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "gemma", "gpt_neox"])
def test_under_mup_the_plans_kinds_choose_the_rule(arch):
    """With a muP plan, exactly the plan's hidden tensors go to Muon: an MoE router's gate is a readout to muP (its
    fan-in grows, its fan-out is the expert count), so it goes to the fallback although it is a 2-D matrix that the
    shape rule sends to Muon without a plan. A user's rule still wins over the plan."""
    from mup_archs import build

    import mup_integration as mi

    model = build(arch)
    plan = mi.get_plan(model)
    kind = {name: plan.params[plan.resolve(name)].kind for name, _ in model.named_parameters()}
    got = _rules(model, hf_optim.create_optimizer("muon_v2", model, lr=0.02))
    assert got == {name: "muon" if kind[name] == "hidden" else "fallback" for name in kind}
    without_plan = _rules(model, hf_optim.create_optimizer("muon_v2", model, lr=0.02, mup=False))
    gates = [name for name in kind if name.endswith("mlp.gate.weight")]
    assert bool(gates) == (arch in ("mixtral", "qwen3_moe"))
    for name in kind:  # the two agree on everything but the gates
        expected = "muon" if name in gates else got[name]
        assert without_plan[name] == expected, name
    if gates:
        rules = [{"match": r"mlp\.gate\.", "optimizer": "muon"}]
        ruled = _rules(model, hf_optim.create_optimizer("muon_v2", model, lr=0.02, groups=rules))
        assert all(ruled[name] == "muon" for name in gates) and ruled["lm_head.weight"] == "fallback"


def _train(model, opt, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randint(0, 64, (2, 8), generator=g)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("fallback", ["adamw_v2", "adafactor_v2"])
def test_one_state_dict_round_trip_and_continue_bitwise(fallback, tmp_path):
    def build():
        torch.manual_seed(0)
        model = LlamaForCausalLM(tiny_llama_config())
        return model, hf_optim.create_optimizer("muon_v2", model, lr=0.02, fallback=fallback, fallback_lr=3e-3)

    straight_model, straight = build()
    _train(straight_model, straight, 6)
    model, opt = build()
    _train(model, opt, 3)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model2, opt2 = build()
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    kinds = {k for s in opt2.state.values() for k in s}
    assert "momentum_buffer" in kinds and len(opt2.state) == len(list(model2.parameters()))
    g = torch.Generator().manual_seed(0)
    for _ in range(3):  # the generator of the straight run: skip the first 3 batches
        torch.randint(0, 64, (2, 8), generator=g)
    for _ in range(3):
        x = torch.randint(0, 64, (2, 8), generator=g)
        model2(input_ids=x, labels=x).loss.backward()
        opt2.step()
        opt2.zero_grad()
    for (name, a), b in zip(straight_model.named_parameters(), model2.parameters()):
        assert torch.equal(a, b), name
    fallback_lrs = {g["lr"] for g in opt2.param_groups if g["rule"] == "fallback"}
    assert fallback_lrs == {3e-3}


def test_trainer_trains_and_resumes_with_muon(tmp_path):
    from transformers import Trainer, TrainingArguments

    class Rule(torch.utils.data.Dataset):
        def __len__(self):
            return 32

        def __getitem__(self, i):
            ids = (torch.arange(8) * (1 + i % 3) + i) % 64
            return {"input_ids": ids, "labels": ids.clone()}

    def trainer(steps, out):
        torch.manual_seed(0)
        args = TrainingArguments(
            output_dir=str(out),
            optim="muon_v2",
            optim_args="adjust=rms",
            learning_rate=2e-3,
            max_steps=steps,
            per_device_train_batch_size=4,
            save_steps=3,
            save_strategy="steps",
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            lr_scheduler_type="constant",
            seed=0,
        )
        return Trainer(model=LlamaForCausalLM(tiny_llama_config()), args=args, train_dataset=Rule())

    full = trainer(6, tmp_path / "full")
    full.train()
    assert type(full.optimizer.optimizer).__name__ == "Muon"
    first = trainer(3, tmp_path / "part")
    first.train()
    resumed = trainer(6, tmp_path / "part")
    resumed.train(resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-3"))
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)


def test_mup_rule_for_muon():
    from mup_integration import make_mup_model

    torch.manual_seed(0)
    model = make_mup_model(tiny_llama_config(hidden_size=64), base_width=16)  # width_mult 4
    for adjust, expected in (("original", 0.02), ("spectral", 0.02), ("rms", 0.02 / 2)):
        opt = hf_optim.create_optimizer("muon_v2", model, lr=0.02, adjust=adjust)
        lr = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
        assert lr[id(model.model.layers[0].mlp.up_proj.weight)] == pytest.approx(expected, rel=1e-12)
        assert lr[id(model.model.embed_tokens.weight)] == pytest.approx(0.02, rel=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(rule="muon"), r"shape \(4,\) is routed to Muon"),
        (dict(ns_steps=0), r"ns_steps must be an integer in \[1, 100\), got 0"),
        (dict(adjust="moonlight"), "adjust must be one of"),
        (dict(orthogonalize="qr"), "orthogonalize must be one of"),
        (dict(momentum=1.0), r"momentum must be in \[0, 1\), got 1.0"),
        (dict(fallback="muon_v2"), "is Muon itself"),
        (dict(fallback="nosuch"), "Unknown optimizer 'nosuch'"),
        (dict(ns_dtype="int8"), "ns_dtype must be one of"),
        (dict(rule="both"), "rule must be one of"),
    ],
)
def test_bad_input_fails_at_construction(kwargs, message):
    params = [torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(3, 3))]
    with pytest.raises(ValueError, match=message):
        Muon(params, **kwargs)


def test_complex_parameters_are_refused():
    with pytest.raises(TypeError, match="does not support complex"):
        Muon([torch.nn.Parameter(torch.zeros(3, 3, dtype=torch.complex64))])


def test_muon_demo_recipe_trains_and_resumes(tmp_path):
    """The bundled Muon recipe through ``hf-optim train`` (a test-sized model): the loss falls, --resume continues."""
    import json

    from test_train import TINY

    from hf_optim.runner import train

    tiny = [*(o for o in TINY if not o.startswith("model.mup.")), "optimizer.lr=1e-2"]  # the recipe has no muP
    out = tmp_path / "run"
    argv = ["shakespeare_muon_llama", *tiny, "--output-dir", str(out), "--threads", "1"]
    assert train.main([*argv, "run.max_steps=30"]) == 0
    summary = json.loads((out / "metrics.json").read_text())["summary"]
    assert summary["final_eval_loss"] < summary["initial_eval_loss"] - 0.3
    saved = torch.load(out / "checkpoint-30" / "optimizer.pt", weights_only=True)
    assert {g["rule"] for g in saved["param_groups"]} == {"muon", "fallback"}
    assert train.main([*argv, "run.max_steps=35", "--resume"]) == 0


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"match": "o_proj", "optimizer": "adam"}, r"optimizer must be one of \['muon', 'fallback'\]"),
        ({"match": "norm", "optimizer": "muon"}, r"shape \(32,\) is routed to Muon"),
    ],
)
def test_bad_routing_rules(rule, message):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    with pytest.raises(ValueError, match=message):
        hf_optim.create_optimizer("muon_v2", model, lr=0.02, groups=[rule])


@pytest.mark.parametrize("adjust", [None, "match_rms_adamw"])
def test_torch_muon_and_adamw_state_dicts_continue_here(adjust):
    """A run with torch.optim.Muon (hidden matrices) + torch.optim.AdamW (the rest) continues in one hf_optim.Muon."""
    from hf_optim.optim.muon.optimizer import from_torch_state_dicts

    def split(model):
        hidden = [p for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n and "lm_head" not in n]
        rest = [p for p in model.parameters() if all(p is not h for h in hidden)]
        return hidden, rest

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    hidden, rest = split(model)
    torch_muon = torch.optim.Muon(hidden, lr=0.02, adjust_lr_fn=adjust)
    torch_adamw = torch.optim.AdamW(rest, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)

    class Both:
        def step(self):
            torch_muon.step()
            torch_adamw.step()

        def zero_grad(self):
            torch_muon.zero_grad()
            torch_adamw.zero_grad()

    _train(model, Both(), 3)
    buffer = io.BytesIO()  # through a checkpoint file, as a real switch would (state_dict() aliases live tensors)
    torch.save({"muon": torch_muon.state_dict(), "adamw": torch_adamw.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    saved = from_torch_state_dicts(checkpoint["muon"], checkpoint["adamw"])

    clone = copy.deepcopy(model)
    hidden2, rest2 = split(clone)
    ours = Muon([{"params": hidden2, "rule": "muon"}, {"params": rest2, "rule": "fallback"}], lr=0.02)
    ours.load_state_dict(saved)
    assert ours.param_groups[1]["lr"] == 3e-3 and ours.param_groups[0]["adjust"] == ("rms" if adjust else "original")
    _train(model, Both(), 3, seed=5)
    _train(clone, ours, 3, seed=5)
    muon_ids = {id(p) for p in hidden}
    for (name, a), b in zip(model.named_parameters(), clone.parameters()):
        # Muon: the fallback's last-bit differences flip bf16 roundings inside Newton-Schulz, at most 2^-8 of each
        # step's scaled update (3 steps, lr 0.02, scale <= 2); AdamW: those flips change the next gradients, and
        # Adam's normalisation passes them on at up to the same 2^-8 of its step (3 steps, lr 3e-3). A state that
        # did not load (zero moments) moves AdamW's parameters by ~lr on the first step: 100x this tolerance.
        atol = 3 * 0.02 * 2 * 2**-8 if id(a) in muon_ids else 3 * 3e-3 * 2**-8
        torch.testing.assert_close(b, a, rtol=0, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


def test_committed_muon_vs_adamw_summary():
    """docs/experiments/muon_vs_adamw: the README's claims recomputed from the committed results."""
    import json
    import statistics

    path = Path(__file__).parents[1] / "docs" / "experiments" / "muon_vs_adamw" / "results.json"
    rows = json.loads(path.read_text())
    assert len(rows) == 16 and {r["steps"] for r in rows} == {300}
    mean: dict[tuple[str, float], float] = {}
    for key in {(r["recipe"], r["lr"]) for r in rows}:
        mean[key] = statistics.mean(r["final_eval_loss"] for r in rows if (r["recipe"], r["lr"]) == key)
    best = {
        name: min((loss, lr) for (recipe, lr), loss in mean.items() if recipe == f"shakespeare_{name}_llama")
        for name in ("adamw", "muon")
    }
    assert best["adamw"][1] == 3e-3 and best["muon"][1] == 1e-2
    assert best["adamw"][0] - best["muon"][0] == pytest.approx(0.254, abs=0.0005)
    assert mean[("shakespeare_adamw_llama", 3e-3)] - mean[("shakespeare_muon_llama", 3e-3)] == pytest.approx(
        0.07, abs=0.005
    )
