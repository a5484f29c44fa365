"""muP optimizer side: per-parameter lr / weight decay against mup 1.0.0 and hand-computed decay per step."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_llama_config

import hf_optim
import mup_integration as mi


def by_name(model, optimizer) -> dict[str, tuple[float, float]]:
    """parameter name -> (lr, weight_decay) of its group."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}


@pytest.fixture(scope="module")
def models():
    """A muP LLaMA (hidden 128, MLP 384) planned against a base (32, 48), and a copy prepared by mup 1.0.0."""
    mup = pytest.importorskip("mup")
    from transformers import LlamaForCausalLM

    cfg = tiny_llama_config(hidden_size=128, intermediate_size=384)
    torch.manual_seed(0)
    ours = mi.make_mup_model(cfg, base_width=32, base_intermediate_size=48)
    with torch.device("meta"):
        base = LlamaForCausalLM(mi.derive_base_config(cfg, 32, base_intermediate_size=48))
    theirs = copy.deepcopy(ours)
    mup.set_base_shapes(theirs, base, rescale_params=False, do_assert=False)  # lm_head is not a MuReadout
    return ours, theirs


def test_adam_rule_equals_mup_muadamw(models):
    """With decay on every parameter (as mup does) the `mup` wd rule reproduces MuAdamW's groups exactly."""
    import mup

    ours, theirs = models
    ref = by_name(theirs, mup.MuAdamW(theirs.parameters(), lr=1e-2, weight_decay=0.1))
    overrides = mi.param_overrides(ours, family="adam", wd_rule="mup", decay_vectors=True)
    got = by_name(ours, hf_optim.AdamW(ours.parameters(), lr=1e-2, weight_decay=0.1, param_overrides=overrides))
    assert got.keys() == ref.keys()
    for name in ref:
        assert got[name] == pytest.approx(ref[name], rel=1e-12), name
    # sanity: the rule is not trivial here (down_proj's width_mult is its fan-in's: 384/48 = 8)
    assert got["model.layers.0.mlp.down_proj.weight"] == pytest.approx((1e-2 / 8, 0.1 * 8))
    assert got["model.layers.0.mlp.up_proj.weight"] == pytest.approx((1e-2 / 4, 0.1 * 4))


def test_sgd_rule_equals_mup_musgd(models):
    import mup

    ours, theirs = models
    ref = by_name(theirs, mup.MuSGD(theirs.parameters(), lr=1e-2, weight_decay=0.1))
    overrides = mi.param_overrides(ours, family="sgd", wd_rule="mup", decay_vectors=True)
    got = by_name(ours, hf_optim.SGDW(ours.parameters(), lr=1e-2, weight_decay=0.1, param_overrides=overrides))
    for name in ref:
        assert got[name] == pytest.approx(ref[name], rel=1e-12), name
    # up_proj: fan_in 128/32 = 4, fan_out 384/48 = 8 -> lr / (4/8); norms and embeddings: lr * 4, wd / 4
    assert got["model.layers.0.mlp.up_proj.weight"] == pytest.approx((2e-2, 0.05))
    assert got["model.norm.weight"] == pytest.approx((4e-2, 0.025))


def test_vectors_are_not_decayed_unless_asked(models):
    ours, _ = models
    opt = hf_optim.AdamW(
        ours.parameters(), lr=1e-2, weight_decay=1e-4, param_overrides=mi.param_overrides(ours, wd_rule="independent")
    )
    got = by_name(ours, opt)
    assert got["model.norm.weight"] == (1e-2, 0.0)
    assert got["model.embed_tokens.weight"] == (1e-2, 1e-4)
    assert got["model.layers.1.self_attn.o_proj.weight"] == pytest.approx((1e-2 / 4, 1e-4))


def test_adafactor_gets_the_adam_rule(models):
    ours, _ = models
    opt = hf_optim.Adafactor(
        ours.parameters(),
        lr=1e-2,
        preset="adafactor_v2",
        param_overrides=mi.param_overrides(ours, family="adam", wd_rule="none"),
    )
    got = by_name(ours, opt)
    assert got["model.layers.0.mlp.down_proj.weight"][0] == pytest.approx(1e-2 / 8)
    assert got["lm_head.weight"][0] == pytest.approx(1e-2)


def _shrink_after_zero_grad_step(model, optimizer) -> dict[str, float]:
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # zero gradient: Adam's update is 0, only the decay moves the weights
    return {n: (p.detach().double() / before[n].double()).mean().item() for n, p in model.named_parameters()}


@pytest.mark.parametrize("width", [64, 128, 256])
@pytest.mark.parametrize("lr", [1e-3, 1e-2])
def test_independent_rule_decay_per_step_is_lambda_eta(width, lr):
    lam = 5e-4
    torch.manual_seed(0)
    model = mi.make_mup_model(tiny_llama_config(hidden_size=width), base_width=32)
    m = width / 32
    opt = hf_optim.AdamW(
        model.parameters(),
        lr=lr,
        weight_decay=lam,
        betas=(0.9, 0.95),
        param_overrides=mi.param_overrides(model, wd_rule="independent"),
    )
    shrink = _shrink_after_zero_grad_step(model, opt)
    hidden = "model.layers.0.self_attn.q_proj.weight"
    assert shrink[hidden] == pytest.approx(1 - lam, abs=1e-7)  # same at every width and lr
    assert shrink["lm_head.weight"] == pytest.approx(1 - lam, abs=1e-7)
    assert shrink["model.norm.weight"] == 1.0
    for g in opt.param_groups:  # a schedule at eta_t = 0.5 halves the decay, still independent of width and lr
        g["lr"] *= 0.5
    assert _shrink_after_zero_grad_step(model, opt)[hidden] == pytest.approx(1 - 0.5 * lam, abs=1e-7)

    # The same rule in PyTorch (lr-coupled) form: group weight_decay = lam * width_mult / lr for hidden matrices.
    groups = mi.mup_param_groups(model, lr=lr, weight_decay=lam, wd_rule="independent")
    q = model.model.layers[0].self_attn.q_proj.weight
    group = next(g for g in groups if any(p is q for p in g["params"]))
    assert group["lr"] == pytest.approx(lr / m) and group["weight_decay"] == pytest.approx(lam * m / lr)
    torch_shrink = _shrink_after_zero_grad_step(model, torch.optim.AdamW(groups, lr=lr))
    assert torch_shrink[hidden] == pytest.approx(1 - lam, abs=1e-7)


@pytest.mark.parametrize("lr", [1e-3, 1e-2])
def test_mup_rule_decay_follows_lr_not_width(lr):
    lam = 0.1
    for width in (64, 128):
        torch.manual_seed(0)
        model = mi.make_mup_model(tiny_llama_config(hidden_size=width), base_width=32)
        opt = hf_optim.AdamW(
            model.parameters(), lr=lr, weight_decay=lam, param_overrides=mi.param_overrides(model, wd_rule="mup")
        )
        shrink = _shrink_after_zero_grad_step(model, opt)
        # (lr / m) * (lam * m) = lr * lam: mup 1.0.0's MuAdamW decay, coupled to the lr
        assert shrink["model.layers.0.mlp.up_proj.weight"] == pytest.approx(1 - lr * lam, abs=1e-7)


def test_none_rule_switches_decay_off():
    model = mi.make_mup_model(tiny_llama_config(hidden_size=64), base_width=32)
    opt = hf_optim.AdamW(
        model.parameters(), lr=1e-2, weight_decay=0.1, param_overrides=mi.param_overrides(model, wd_rule="none")
    )
    assert all(g["weight_decay"] == 0.0 for g in opt.param_groups)


def test_torch_groups_train_like_hf_optim():
    """mup_param_groups + torch.optim.AdamW == hf_optim.AdamW + param_overrides over real gradient steps.

    In float64: in float32 one-ulp differences in the two optimizers' rounding reach the loss, and Adam's
    sign-like steps on near-zero gradients amplify them, which says nothing about the group rules under test.
    """
    torch.manual_seed(0)
    a = mi.make_mup_model(tiny_llama_config(hidden_size=64), base_width=32).double()
    b = copy.deepcopy(a)
    opt_a = hf_optim.AdamW(
        a.parameters(), lr=1e-2, weight_decay=1e-4, implementation="for-loop", param_overrides=mi.param_overrides(a)
    )
    opt_b = torch.optim.AdamW(mi.mup_param_groups(b, lr=1e-2, weight_decay=1e-4), lr=1e-2, foreach=False)
    ids = torch.randint(0, 64, (2, 8))
    for _ in range(3):
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            model(ids, labels=ids).loss.backward()
            opt.step()
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-10, atol=1e-12, msg=n)


def test_frozen_parameters_get_no_override():
    model = mi.make_mup_model(tiny_llama_config(hidden_size=64), base_width=32)
    model.model.embed_tokens.weight.requires_grad_(False)
    ov = mi.param_overrides(model)
    assert model.model.embed_tokens.weight not in ov
    hf_optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=1e-4, param_overrides=ov)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(family="adamw"), ValueError, "family must be one of"),
        (dict(wd_rule="decoupled"), ValueError, "wd_rule must be one of"),
        (dict(decay_vectors="yes"), TypeError, "decay_vectors must be True or False"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    model = mi.make_mup_model(tiny_llama_config(hidden_size=64), base_width=32)
    with pytest.raises(error, match=match):
        mi.param_overrides(model, **kwargs)


@pytest.mark.parametrize(
    "spec", [s for s in hf_optim.list_optimizers() if s.target.startswith("hf_optim.")], ids=lambda s: s.name
)
def test_every_registered_optimizer_takes_the_plan(spec):
    """Each built-in optimizer accepts the overrides of its muP family and steps with the multiplied lr."""
    torch.manual_seed(0)
    model = mi.make_mup_model(tiny_llama_config(hidden_size=128), base_width=32)  # m = 4, fan ratio 1
    cls = spec.resolve()
    family = spec.mup_rule({**spec.knobs(), **spec.defaults})
    opt = cls(
        model.parameters(),
        **{**spec.defaults, "lr": 1e-2, "weight_decay": 1e-4},
        param_overrides=mi.param_overrides(model, family=family, wd_rule="independent"),
    )
    groups = by_name(model, opt)
    q, norm = "model.layers.0.self_attn.q_proj.weight", "model.norm.weight"
    if family == "adam":  # hidden lr / m, everything else unchanged
        assert groups[q][0] == pytest.approx(1e-2 / 4) and groups[norm][0] == pytest.approx(1e-2)
    elif family == "muon":  # an orthogonalised update's spectral norm does not grow with width: nothing changes
        assert groups[q][0] == pytest.approx(1e-2) and groups[norm][0] == pytest.approx(1e-2)
    else:  # mup.MuSGD: hidden lr / (fan_in_mult / fan_out_mult) = lr, vectors and embeddings lr * m
        assert groups[q][0] == pytest.approx(1e-2) and groups[norm][0] == pytest.approx(4e-2)
    assert groups[norm][1] == 0.0
    ids = torch.randint(0, 64, (2, 8))
    model(ids, labels=ids).loss.backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not torch.equal(before[q], model.get_parameter(q))


def test_adam_first_step_size_follows_the_plan():
    """Adam's first update is lr * g / (|g| + eps) ~ lr per entry: hidden entries move by at most lr / m."""
    torch.manual_seed(0)
    model = mi.make_mup_model(tiny_llama_config(hidden_size=128), base_width=32)
    opt = hf_optim.AdamW(
        model.parameters(),
        lr=1e-2,
        weight_decay=0.0,
        eps=1e-12,
        param_overrides=mi.param_overrides(model, wd_rule="none"),
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, 64, (2, 8))
    model(ids, labels=ids).loss.backward()
    opt.step()
    step = {n: (p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters()}
    assert step["model.layers.1.mlp.down_proj.weight"] == pytest.approx(1e-2 / 4, rel=1e-3)
    assert step["lm_head.weight"] == pytest.approx(1e-2, rel=1e-3)
