"""Recipes: schema, sources/unknown bookkeeping, optimizer + scheduler construction, lr == the paper's formula."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from hf_optim.runner import build, schema
from hf_optim.runner.data import load_corpus
from hf_optim.runner.schedules import make_multiplier
from tests.conftest import tiny_llama_config

RECIPE_FILES = sorted(p for sub in ("llm", "demo") for p in (schema.RECIPES_DIR / sub).glob("*.yaml"))
PUBLISHED = [
    "llama1",
    "llama2",
    "llama3",
    "gpt3",
    "palm",
    "t5",
    "opt",
    "pythia",
    "olmo2",
    "bloom",
    "deepseek_v3",
    "deepseek_v2_lite",
]


def _tiny():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config())


def lr_at(recipe, k, size=None):
    return build.size_settings(recipe, size)["lr"] * build.multiplier(recipe, size=size)(k)


def test_every_published_recipe_is_bundled():
    names = {p.stem for p in RECIPE_FILES}
    assert set(PUBLISHED) <= names


@pytest.mark.parametrize("path", RECIPE_FILES, ids=[p.stem for p in RECIPE_FILES])
def test_recipe_validates_and_builds(path):
    recipe = schema.load(path)
    if recipe["kind"] == "published":
        assert recipe["sources"] and isinstance(recipe["unknown"], list)
    model = _tiny()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = build.build_optimizer(recipe, model)
        # Recipes that state no run length (LLaMA-3, OLMo-2) get an arbitrary one: the schedule shape is what is tested.
        steps = build.published_num_steps(recipe) or (recipe.get("run") or {}).get("max_steps") or 100_000
        sched = build.build_scheduler(recipe, opt, steps)
    expected0 = build.size_settings(recipe)["lr"] * build.multiplier(recipe, steps)(0)
    # muP / per-group multipliers scale each group's lr; group 0 here is a plain decay group of a non-muP model.
    assert opt.param_groups[0]["lr"] == pytest.approx(expected0)
    for _ in range(2):
        loss = model(input_ids=torch.randint(0, 64, (2, 8)), labels=torch.randint(0, 64, (2, 8))).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(
        build.size_settings(recipe)["lr"] * build.multiplier(recipe, steps)(2)
    )


def test_llama2_cosine_to_ten_percent_after_2000_warmup():
    r = schema.load("llama2")
    peak, total = 3.0e-4, round(2.0e12 / 4.0e6)  # 7B; 2T tokens at 4M tokens per step

    def paper(k):
        if k < 2000:
            return peak * k / 2000
        return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (k - 2000) / (total - 2000)))))

    for k in (0, 1, 1000, 1999, 2000, 100_000, 250_000, total - 1, total, total + 10):
        assert lr_at(r, k, "7B") == pytest.approx(paper(k), rel=1e-12, abs=1e-18)
    assert lr_at(r, total, "70B") == pytest.approx(1.5e-5)
    opt = build.build_optimizer(r, _tiny(), size="7B")
    group = opt.param_groups[0]
    assert (group["betas"], group["eps"], group["weight_decay"], group["weight_decay_mode"]) == (
        (0.9, 0.95),
        1e-5,
        0.1,
        "coupled",
    )


def test_palm_constant_then_inverse_sqrt_with_lr_squared_decay():
    r = schema.load("palm")
    for k in (0, 1, 5000, 10_000):
        assert lr_at(r, k) == pytest.approx(1e-2)
    for k in (10_001, 40_000, 250_000):
        assert lr_at(r, k) == pytest.approx(1e-2 * math.sqrt(1e4 / k), rel=1e-12)
    # Dynamic weight decay lr_t^2: with a zero gradient the step only decays, x <- x (1 - lr_t^2).
    model = _tiny()
    opt = build.build_optimizer(r, model)
    group = opt.param_groups[0]
    assert (group["weight_decay_mode"], group["weight_decay"], group["factored"], group["beta1"]) == (
        "corrected",
        1e-2,
        False,
        0.9,
    )
    for k in (40_000, 160_000):
        _assert_zero_grad_step_decays_by_lr_squared(opt, model, 1e-2 * math.sqrt(1e4 / k))


def _assert_zero_grad_step_decays_by_lr_squared(opt, model, lr_t: float) -> None:
    """With zero gradients one step only decays: PaLM's x <- x (1 - lr_t^2)."""
    for g in opt.param_groups:
        g["lr"] = lr_t  # what the scheduler sets at that step
    p = opt.param_groups[0]["params"][0]
    before = p.detach().clone().double()
    for q in model.parameters():
        q.grad = torch.zeros_like(q)
    opt.step()
    torch.testing.assert_close(p.detach().double(), before * (1 - lr_t**2), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("lr", [3e-3, 2e-2])
def test_palm_decay_stays_lr_squared_when_the_lr_is_overridden(lr):
    # lambda = lr_peak is a sentinel resolved when the optimizer is built: with a literal 1e-2 an lr override would
    # turn the decay into (lr_t^2 / lr) * 1e-2 instead of PaLM's lr_t^2.
    r = schema.load("palm", [f"optimizer.lr={lr}"])
    assert r["optimizer"]["weight_decay"] == "lr_peak" and build.weight_decay(r) == lr
    model = _tiny()
    opt = build.build_optimizer(r, model)
    group = opt.param_groups[0]
    assert (group["weight_decay_mode"], group["weight_decay"]) == ("corrected", lr)
    # the inverse_sqrt_max schedule at step 40k, peak = the overridden lr
    _assert_zero_grad_step_decays_by_lr_squared(opt, model, lr * math.sqrt(1e4 / 40_000))


def test_palm_knobs_the_paper_does_not_state_are_listed_with_assumptions():
    r = schema.load("palm")
    for knob, value in (("eps1", 1e-30), ("eps2", 1e-3), ("momentum_before_lr", False)):
        path = f"optimizer.args.{knob}"
        assert path in r["unknown"] and r["assumptions"].get(path), path
        assert r["optimizer"]["args"][knob] == value  # stated in the recipe, not inherited silently from the preset
    group = build.build_optimizer(r, _tiny()).param_groups[0]
    assert (group["eps1"], group["eps2"], group["momentum_before_lr"]) == (1e-30, 1e-3, False)


def test_weight_decay_sentinel_is_validated(tmp_path):
    with pytest.raises(schema.RecipeError, match=r"optimizer\.weight_decay must be a number or 'lr_peak'.*'lr'"):
        schema.load("palm", ["optimizer.weight_decay=lr"])
    text = "name: x\nkind: demo\noptimizer: {name: adamw_v2, weight_decay: lr_peak}\n"
    with pytest.raises(schema.RecipeError, match=r"states no optimizer.lr"):
        schema.load(_write(tmp_path, text))
    # A number still works and is used as is.
    assert build.weight_decay(schema.load("palm", ["optimizer.weight_decay=0.5"])) == 0.5


def test_t5_inverse_sqrt_max():
    r = schema.load("t5")
    for k in (0, 1, 9999, 10_000, 10_001, 100_000, 524_288):
        assert lr_at(r, k) == pytest.approx(1 / math.sqrt(max(k, 1e4)), rel=1e-12)


def test_gpt3_token_based_warmup_and_floor():
    r = schema.load("gpt3")
    warm, decay = round(375e6 / 5e5), round(260e9 / 5e5)  # 125M: 0.5M-token batches
    assert lr_at(r, warm // 2, "125M") == pytest.approx(6e-4 * (warm // 2) / warm)
    mid = (warm + decay) // 2
    assert lr_at(r, mid, "125M") == pytest.approx(
        6e-4 * (0.1 + 0.45 * (1 + math.cos(math.pi * (mid - warm) / (decay - warm))))
    )
    assert lr_at(r, decay + 50_000, "125M") == pytest.approx(6e-5)


def test_deepseek_schedules_at_token_counts():
    v3 = schema.load("deepseek_v3")
    steps = build.published_num_steps(v3)
    at = lambda tokens: lr_at(v3, int(tokens / 14.8e12 * steps))
    assert lr_at(v3, 1000) == pytest.approx(2.2e-4 * 1000 / 2000)
    assert at(5e12) == pytest.approx(2.2e-4)
    assert at(12.15e12) == pytest.approx(2.2e-5 + (2.2e-4 - 2.2e-5) * 0.5, rel=1e-3)  # cosine midpoint
    assert at(14.45e12) == pytest.approx(2.2e-5)
    assert at(14.75e12) == pytest.approx(7.3e-6, rel=1e-4)
    lite = schema.load("deepseek_v2_lite")
    n = build.published_num_steps(lite)
    assert lr_at(lite, int(0.5 * n)) == pytest.approx(4.2e-4)
    assert lr_at(lite, int(0.85 * n)) == pytest.approx(4.2e-4 * 0.316)
    assert lr_at(lite, int(0.95 * n)) == pytest.approx(4.2e-4 * 0.316**2)


def test_pythia_warmup_is_one_percent_and_floor_ten_percent():
    r = schema.load("pythia")
    assert lr_at(r, 715, "160M") == pytest.approx(6e-4 * 715 / 1430)
    assert lr_at(r, 143_000, "160M") == pytest.approx(6e-5)


def _cosine_floor(peak, k, warm, decay, floor):
    """The papers' rule written out: linear warm-up from 0, cosine from peak to floor*peak, then flat."""
    if k < warm:
        return peak * k / warm
    p = min(1.0, (k - warm) / (decay - warm))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


def test_llama1_cosine_over_the_whole_run_per_size():
    r = schema.load("llama1")
    for size, peak, tokens in (("6.7B", 3e-4, 1.0e12), ("65.2B", 1.5e-4, 1.4e12)):
        total = round(tokens / 4e6)  # 4M-token batches (Table 2)
        for k in (500, 2000, 100_000, total // 2, total, total + 7):
            assert lr_at(r, k, size) == pytest.approx(_cosine_floor(peak, k, 2000, total, 0.1), rel=1e-12)
    assert lr_at(r, 350_000, "65.2B") == pytest.approx(1.5e-5)


def test_llama3_405b_warmup_8000_cosine_to_8e_7_over_1_2m_steps():
    r = schema.load("llama3")
    multiplier = build.multiplier(r, num_training_steps=1_200_000, size="405B")
    lr = lambda k: 8e-5 * multiplier(k)
    assert lr(4000) == pytest.approx(4e-5)
    assert lr(8000) == pytest.approx(8e-5)
    assert lr(8000 + (1_200_000 - 8000) // 2) == pytest.approx(8e-7 + (8e-5 - 8e-7) * 0.5)
    assert lr(1_200_000) == pytest.approx(8e-7)
    # 8B and 70B: only the peak lr is published; warm-up and floor are listed as unknown, not invented.
    assert {"schedule.warmup_steps", "schedule.floor"} <= set(r["unknown"])
    assert build.size_settings(r, "8B")["lr"] == 3e-4 and build.size_settings(r, "70B")["lr"] == 1.5e-4


def test_unstated_schedule_fields_are_logged_not_hidden(caplog):
    r = schema.load("llama3")
    assert build.unstated_schedule_fields(r, "405B") == []
    assert len(build.unstated_schedule_fields(r, "8B")) == 2
    assert build.unstated_schedule_fields(schema.load("llama2"), "7B") == []
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)
    with caplog.at_level("WARNING", logger="hf_optim.runner.build"):
        sched = build.build_scheduler(r, opt, 1000, size="8B")
    assert "warm-up" in caplog.text and "floor" in caplog.text
    # ... and the defaults that then apply are the schedule's own: no warm-up, cosine from the peak down to 0.
    assert sched.get_last_lr()[0] == pytest.approx(3e-4)
    for _ in range(500):
        opt.step()
        sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(1.5e-4)


def test_olmo2_cosine_to_ten_percent_over_a_5t_token_horizon():
    r = schema.load("olmo2")
    # Released stage-1 configs: cosine over t_max = 5e12 tokens to alpha_f = 0.1; 1024 / 2048 sequences of 4096.
    for size, peak, batch in (("7B", 3e-4, 1024 * 4096), ("13B", 9e-4, 2048 * 4096)):
        horizon = round(5e12 / batch)
        for run_length in (10_000, 2_000_000):  # the decay follows the token horizon, not the run's length
            m = build.multiplier(r, num_training_steps=run_length, size=size)
            for k in (1, 1000, 2000, 5000, 300_000, horizon // 2, horizon, horizon + 5):
                assert peak * m(k) == pytest.approx(_cosine_floor(peak, k, 2000, horizon, 0.1), rel=1e-12)
    # Stage 1 as run: the 7B stopped at step 928,646 (~3.9T tokens), the 13B at step 596,057 (5.0T tokens).
    assert build.published_num_steps(r, "7B") == 928_646 and build.published_num_steps(r, "13B") == 596_057
    # Cross-checks against the stage-2 configs, whose start lr is where stage 1 left off: 6.1499e-5 for the 7B
    # (which matches step 928,000 of the cosine) and 9e-5 = 10 % of the 13B peak, its cosine already at the floor.
    assert lr_at(r, 928_000, "7B") == pytest.approx(6.1499e-5, rel=2e-4)
    assert lr_at(r, 596_057, "13B") == pytest.approx(9e-5, rel=1e-12)
    assert "schedule.floor" not in r["unknown"]  # now sourced from the released configs (alpha_f)


def test_bloom_token_warmup_and_cosine_over_410b_tokens():
    r = schema.load("bloom")
    for size, peak, batch in (("560M", 3e-4, 256 * 2048), ("176B", 6e-5, 2048 * 2048)):
        warm, decay = round(375e6 / batch), round(410e9 / batch)
        for k in (warm // 3, warm, (warm + decay) // 2, decay, decay + 100):
            assert lr_at(r, k, size) == pytest.approx(_cosine_floor(peak, k, warm, decay, 0.1), rel=1e-12)
    assert build.published_num_steps(r, "176B") == round(366e9 / (2048 * 2048))


def test_explicit_lr_beats_the_per_size_table():
    # Without this, `hf-optim train llm/llama2 optimizer.lr=3e-3` would silently keep 7B's 3e-4 from `sizes`.
    r = schema.load("llama2", ["optimizer.lr=3e-3", "schedule.warmup_steps=20"])
    assert build.size_settings(r, "7B")["lr"] == 3e-3 and build.size_settings(r, "70B")["lr"] == 3e-3
    assert build.schedule_kwargs(r, 100, "7B")[1]["num_warmup_steps"] == 20


def test_tiny_demo_inherits_llama2_settings_with_its_own_lr_and_warmup():
    r = schema.load("llama2_tiny_mup")
    assert r["sources"] == schema.load("llama2")["sources"]
    m = build.multiplier(r, num_training_steps=300)
    peak = 3e-3
    assert [peak * m(k) for k in (15, 30)] == pytest.approx([peak * 15 / 30, peak])
    assert peak * m(165) == pytest.approx(peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 135 / 270))))
    assert peak * m(300) == pytest.approx(3e-4)
    from transformers import LlamaForCausalLM

    from mup_integration.surgery import make_mup_model

    model = make_mup_model(tiny_llama_config(hidden_size=64), base_width=32, model_cls=LlamaForCausalLM)
    opt = build.build_optimizer(r, model)
    # muP (Adam family): hidden matrices at width 64 = 2 x base width get lr / 2, everything else the peak lr.
    assert sorted({g["lr"] for g in opt.param_groups}) == pytest.approx([peak / 2, peak])
    g = opt.param_groups[0]
    assert (g["betas"], g["eps"], g["weight_decay_mode"]) == ((0.9, 0.95), 1e-5, "coupled")


def test_olmo2_excludes_only_embeddings_from_decay():
    r = schema.load("olmo2")
    names = build.decay_parameter_names(_tiny(), r["optimizer"]["no_decay"])
    assert "model.embed_tokens.weight" not in names
    assert "model.norm.weight" in names and "model.layers.0.self_attn.q_proj.weight" in names
    default = build.decay_parameter_names(_tiny(), None)
    assert "model.embed_tokens.weight" in default and "model.norm.weight" not in default


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, key, hint",
    [
        (
            "name: x\nkind: demo\noptimizer: {name: adamw_v2, weigth_decay: 0.1}\n",
            "optimizer.weigth_decay",
            "weight_decay",
        ),
        ("name: x\nkind: demo\nschedul: {name: cosine_to_floor}\n", "schedul", "schedule"),
        ("name: x\nkind: demo\nrun: {max_step: 3}\n", "run.max_step", "max_steps"),
    ],
)
def test_unknown_key_names_key_and_closest(tmp_path, text, key, hint):
    with pytest.raises(schema.RecipeError, match=rf"unknown key '{key}'\. Did you mean '{hint}'\?"):
        schema.load(_write(tmp_path, text))


def test_override_typo_and_value_parsing():
    r = schema.load("llama2", ["optimizer.lr=3e-3", "optimizer.betas=[0.9, 0.99]"])
    assert r["optimizer"]["lr"] == 3e-3 and r["optimizer"]["betas"] == [0.9, 0.99]
    with pytest.raises(schema.RecipeError, match=r"Did you mean 'run.max_steps'"):
        schema.load("demo", ["run.max_stepz=3"])


def test_size_overrides_need_an_existing_size_and_key():
    sizes = r"\['7B', '13B', '34B', '70B'\]"
    with pytest.raises(schema.RecipeError, match=rf"unknown size '7X'.*{sizes}.*Did you mean '7B'"):
        schema.load("llama2", ["sizes.7X.lr=1e-3"])
    with pytest.raises(schema.RecipeError, match=r"unknown per-size key 'lrr'.*Did you mean 'lr'"):
        schema.load("llama2", ["sizes.7B.lrr=1e-3"])
    with pytest.raises(schema.RecipeError, match="unknown size"):
        schema.load("demo", ["sizes.7B.lr=1e-3"])  # the demo has no sizes table
    r = schema.load("llama2", ["sizes.13B.lr=1e-3"])
    assert build.size_settings(r, "13B")["lr"] == 1e-3 and build.size_settings(r, "7B")["lr"] == 3e-4
    assert list(r["sizes"]) == ["7B", "13B", "34B", "70B"]  # nothing added
    g = schema.load("gpt3", ["sizes.1.3B.lr=1e-4"])  # a label with a dot
    assert build.size_settings(g, "1.3B")["lr"] == 1e-4 and "1" not in g["sizes"]


def test_run_size_must_be_a_size_of_the_recipe():
    with pytest.raises(schema.RecipeError, match=r"run\.size='7X'.*Did you mean '7B'"):
        schema.load("llama2", ["run.size=7X"])
    with pytest.raises(schema.RecipeError, match=r"run\.size='7B'.*no sizes table"):
        schema.load("demo", ["run.size=7B"])
    assert schema.load("llama2", ["run.size=70B"])["run"]["size"] == "70B"


def test_assumption_overrides_name_a_field():
    r = schema.load("llama2", ["assumptions.optimizer.eps=because"])
    assert r["assumptions"]["optimizer.eps"] == "because"  # the entry's key is the dotted path, not a nested map
    assert "optimizer" not in r["assumptions"]
    with pytest.raises(schema.RecipeError, match=r"assumptions entry 'optimizer\.epz'.*Did you mean 'optimizer\.eps'"):
        schema.load("llama2", ["assumptions.optimizer.epz=because"])


@pytest.mark.parametrize("fraction", [1.0, 1.5, -0.1])
def test_warmup_fraction_must_be_in_unit_interval(fraction):
    with pytest.raises(schema.RecipeError, match=rf"schedule\.warmup_fraction must be in \[0, 1\).*{fraction}"):
        schema.load("pythia", [f"schedule.warmup_fraction={fraction}"])
    # build.py checks it too, for recipes that never went through schema.load
    recipe = {"name": "x", "schedule": {"name": "cosine_to_floor", "warmup_fraction": fraction}}
    with pytest.raises(ValueError, match=r"schedule\.warmup_fraction must be in \[0, 1\)"):
        build.schedule_kwargs(recipe, 100)


def test_warmup_fraction_in_range_gives_that_share_of_the_steps():
    r = schema.load("pythia", ["schedule.warmup_fraction=0.25"])
    assert build.schedule_kwargs(r, 400, "160M")[1]["num_warmup_steps"] == 100


def test_yaml_is_loaded_safely(tmp_path):
    path = _write(tmp_path, "name: !!python/object/apply:os.system ['echo pwned > /dev/null']\nkind: demo\n")
    # yaml.safe_load refuses the tag (nothing runs); the refusal is one RecipeError naming the file and line
    with pytest.raises(
        schema.RecipeError, match=r"r\.yaml: YAML error at line 1, column 7: could not determine a constructor"
    ):
        schema.load(path)


def test_published_recipe_must_list_unstated_fields(tmp_path):
    base = yaml.safe_load((schema.RECIPES_DIR / "llm" / "llama2.yaml").read_text())
    base["optimizer"]["eps"] = None
    path = _write(tmp_path, yaml.safe_dump(base))
    with pytest.raises(schema.RecipeError, match=r"optimizer.eps has no value"):
        schema.load(path)
    base["unknown"].append("optimizer.eps")
    base["optimizer"]["eps"] = 1e-8
    path = _write(tmp_path, yaml.safe_dump(base))
    with pytest.raises(schema.RecipeError, match=r"assumptions.optimizer.eps"):
        schema.load(path)
    del base["sources"]
    with pytest.raises(schema.RecipeError, match="sources"):
        schema.load(_write(tmp_path, yaml.safe_dump(base)))


def test_schedule_parameter_errors():
    with pytest.raises(ValueError, match="Did you mean 'floor'"):
        make_multiplier("cosine_to_floor", num_training_steps=10, flor=0.1)
    with pytest.raises(ValueError, match="schedule must be one of"):
        make_multiplier("cosine", num_training_steps=10)
    with pytest.raises(ValueError, match="floor"):
        make_multiplier("linear_to_floor", num_training_steps=10, floor=2.0)


def test_linear_to_floor_matches_opt():
    r = schema.load("opt")
    warm, decay = round(375e6 / 5e5), round(300e9 / 5e5)
    k = warm + (decay - warm) // 4
    assert lr_at(r, k, "125M") == pytest.approx(6e-4 * (1 - 0.9 * (k - warm) / (decay - warm)))
    assert build.schedule_kwargs(r, size="175B")[1]["num_warmup_steps"] == 2000


def test_factored_adafactor_refused_under_deepspeed():
    from hf_optim.optim.adafactor.optimizer import Adafactor

    with pytest.raises(ValueError, match="DeepSpeed ZeRO"):
        build.check_deepspeed(Adafactor, {"preset": "adafactor_v2"}, deepspeed=True, fallback=False)
    with pytest.warns(UserWarning, match="unfactored"):
        kwargs = build.check_deepspeed(Adafactor, {"preset": "adafactor_v2"}, deepspeed=True, fallback=True)
    assert kwargs["factored"] is False
    palm = {"preset": "palm"}
    assert build.check_deepspeed(Adafactor, palm, deepspeed=True, fallback=False) is palm
    assert build.check_deepspeed(torch.optim.AdamW, {}, deepspeed=True, fallback=False) == {}


def test_corpus_char_and_byte():
    corpus = load_corpus(block_size=32, max_tokens=10_000)
    assert corpus.vocab_size == 65 and len(corpus.train) == 9000 // 32 and len(corpus.val) == 1000 // 32
    row = corpus.train[0]["input_ids"]
    assert corpus.decode(row) == Path(schema.RECIPES_DIR.parent / "hf_optim/data/tinyshakespeare.txt").read_text()[:32]
    byte = load_corpus(tokenizer="byte", block_size=16, max_tokens=1000)
    assert byte.vocab_size == 256 and byte.decode(byte.train[0]["input_ids"]) == "First Citizen:\nB"
    with pytest.raises(ValueError, match=r"data.tokenizer"):
        load_corpus(tokenizer="bpe")


@pytest.mark.parametrize("val_fraction, tokens, block", [(0.0, 10_000, 32), (0.002, 10_000, 32), (0.01, 4000, 64)])
def test_validation_split_smaller_than_one_block_is_refused(val_fraction, tokens, block):
    import re

    with pytest.raises(ValueError, match=rf"data\.val_fraction={val_fraction}.*data\.block_size={block}") as info:
        load_corpus(block_size=block, val_fraction=val_fraction, max_tokens=tokens)
    # The suggested minimum really gives one validation block: int(tokens * f) >= block.
    suggested = float(re.search(r"val_fraction >= ([0-9.e-]+?)\.?$", str(info.value)).group(1))
    assert suggested >= block / tokens
    assert len(load_corpus(block_size=block, val_fraction=suggested, max_tokens=tokens).val) >= 1


def test_corpus_too_small_for_both_splits_says_so():
    with pytest.raises(ValueError, match="larger corpus"):
        load_corpus(block_size=128, val_fraction=0.1, max_tokens=200)
