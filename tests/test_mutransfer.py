"""``hf-optim mutransfer``: errors before any training, the FLOP count against real models, the search's choices, an
end-to-end tiny run (tuned.yaml trains as is; resuming trains nothing), and the committed example (report recomputed
from its results; the transfer meets issue 27's acceptance; its tuned.yaml trains under ``accelerate launch``)."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

import _launch
import pytest
import yaml

from hf_optim.runner import _mutransfer_plan as plan
from hf_optim.runner import _mutransfer_search as search
from hf_optim.runner import mutransfer, schema

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "experiments" / "mutransfer"
DEPTH_EXAMPLE = ROOT / "docs" / "experiments" / "mutransfer_depth"
BIN = Path(sys.executable).parent

TINY = {
    "name": "tiny_mutransfer",
    "kind": "demo",
    "optimizer": {"name": "adamw_v2", "lr": 4.0e-3, "betas": [0.9, 0.95], "eps": 1.0e-8, "weight_decay": 0.0,
                  "weight_decay_mode": "coupled"},
    "schedule": {"name": "cosine_to_floor", "warmup_steps": 1, "floor": 0.1},
    "model": {"arch": "llama", "hidden_size": 64, "num_layers": 1, "num_heads": 2, "intermediate_size": 128,
              "mup": {"base_width": 32}},
    "data": {"corpus": "tinyshakespeare", "tokenizer": "char", "block_size": 16, "max_tokens": 8000},
    "run": {"max_steps": 3, "batch_size": 2, "eval_batches": 1, "logging_steps": 1, "eval_steps": 3,
            "save_steps": 3, "seed": 0},
}  # fmt: skip


def _recipe(tmp_path: Path, **changes) -> Path:
    recipe = schema.deep_merge(TINY, changes)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _main(tmp_path: Path, *argv: str, capsys) -> tuple[int, str]:
    code = mutransfer.main([*argv, "--out", str(tmp_path / "out")])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("change", "argv", "message"),
    [
        (None, [], "no model.mup.base_width"),
        ({}, ["--proxy-width", "128"], "wider than the target"),
        ({}, ["--proxy-width", "33"], "not a multiple of the target's 2 heads"),
        ({}, ["--proxy-depth", "1"], "no depth scaling"),
        ({}, ["--budget", "0.01"], "more than the budget"),
        ({}, ["--budget", "0"], "--budget must be a number > 0"),
        ({}, ["--seeds", "0"], "--seeds must be an integer >= 1"),
        ({}, ["--lr-span", "0"], "--lr-span must be an integer >= 1"),
        ({}, ["--lr-resolution", "0.25"], "--lr-resolution must be one of"),
        ({"optimizer": {"lr": None}}, [], "states no optimizer.lr"),
        ({"model": {"intermediate_size": 99}}, ["--budget", "9"], "is not an integer"),
    ],
)
def test_bad_input_is_refused_before_any_training(tmp_path, capsys, change, argv, message):
    # None: a bundled recipe without muP
    recipe = ROOT / "recipes/demo/shakespeare_adamw_llama.yaml" if change is None else _recipe(tmp_path, **change)
    code, err = _main(tmp_path, str(recipe), *argv, capsys=capsys)
    assert code == 2 and message in err, err
    assert not (tmp_path / "out").exists()  # nothing ran, nothing was written


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("width", [32, 96])
def test_parameter_count_of_the_flop_estimate_is_the_built_models(arch, width):
    from hf_optim.runner._train_model import MODEL_DEFAULTS, build_model

    cfg = {**MODEL_DEFAULTS, "arch": arch, "hidden_size": width, "num_layers": 3, "num_heads": 4,
           "intermediate_size": 3 * width}  # fmt: skip
    model = build_model(cfg, vocab_size=65, block_size=16)
    shape = plan.Shape(width, 3, 4, 3 * width)
    assert plan.n_params(arch, shape, 65, 16) == sum(p.numel() for p in model.parameters())


def test_proxy_keeps_heads_and_scales_the_mlp_like_the_mup_base_model():
    from transformers import LlamaConfig

    from mup_integration._base_config import derive_base_config

    target = plan.load_target(str(ROOT / "recipes/demo/mutransfer_llama_w512.yaml"))
    proxy = plan.proxy_shape(target, None, None)
    base = derive_base_config(
        LlamaConfig(hidden_size=512, num_attention_heads=4, num_key_value_heads=4, intermediate_size=1024), 64
    )
    assert (proxy.width, proxy.heads, proxy.intermediate) == (
        base.hidden_size,
        base.num_attention_heads,
        base.intermediate_size,
    )


def _row(stage, log2_lr, loss, seed=0, role="proxy", out=1.0):
    return {"role": role, "stage": stage, "log2_lr": log2_lr, "output_mult": out, "attn_mult": 1.0,
            "weight_decay": 0.0, "seed": seed, "val_loss": loss, "diverged": loss is None, "flops": 1.0,
            "seconds": 1.0}  # fmt: skip


def test_search_averages_seeds_counts_a_diverged_seed_as_inf_and_keeps_the_incumbent_on_ties():
    rows = [_row("lr", -8, 2.0), _row("lr", -8, 2.2, seed=1), _row("lr", -7, 1.9), _row("lr", -7, None, seed=1)]
    table = search.scores(rows)
    assert table[(-8.0, 1.0, 1.0, 0.0)] == (pytest.approx(2.1), 2)
    assert table[(-7.0, 1.0, 1.0, 0.0)][0] == math.inf
    best = search.choose(rows, None)
    assert best[0][0] == -8.0
    assert search.choose([_row("lr_fine", -8.5, 2.1)], best)[0][0] == -8.0  # a tie keeps the incumbent
    replayed = search.replay([*rows, _row("output_mult", -8, 2.05, out=2.0)], mutransfer.STAGES)
    assert replayed["optimum"]["output_mult"] == 2.0 and replayed["proxy_loss"] == pytest.approx(2.05)
    assert search.at_edge([-9.0, -8.0, -7.0], -7.0) == 1 and search.at_edge([-9.0, -8.0, -7.0], -8.0) == 0


@pytest.mark.slow
def test_tiny_end_to_end_writes_a_tuned_recipe_that_trains_and_resumes_without_training(tmp_path, capsys):
    recipe = _recipe(tmp_path, optimizer={"weight_decay": 1.0e-3, "weight_decay_mode": "independent"},
                     model={"mup": {"wd_rule": "independent"}})  # fmt: skip
    argv = [str(recipe), "--lr-span", "1", "--lr-resolution", "0.5", "--jobs", "2", "--budget", "3", "--direct",
            "--verify"]  # fmt: skip
    assert mutransfer.main([*argv, "--out", str(tmp_path / "out")]) == 0
    out = tmp_path / "out"
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    report = json.loads((out / "report.json").read_text())
    assert {s["stage"] for s in report["stages"]} >= {"lr", "lr_fine", "output_mult", "attn_mult", "weight_decay"}
    # the weight-decay stage ran because the recipe decays under a width-free muP rule
    assert any(r["stage"] == "weight_decay" for r in rows)
    tuned = schema.load(out / "tuned.yaml")
    optimum = report["optimum"]
    assert tuned["optimizer"]["lr"] == 2.0 ** optimum["log2_lr"]
    assert tuned["model"]["mup"]["output_mult"] == optimum["output_mult"]
    assert tuned["provenance"]["proxy"]["width"] == 32 and tuned["provenance"]["target"]["width"] == 64
    # --verify trained tuned.yaml as is: the plain run's loss is the report's 1x
    plain = [r for r in rows if r["plain"]]
    assert len(plain) == 1 and report["verify"]["loss"]["1x"] == plain[0]["val_loss"]
    assert report == json.loads(json.dumps({**search.summarize(rows, mutransfer.STAGES),
                                            "settings": report["settings"]}))  # fmt: skip
    capsys.readouterr()
    assert mutransfer.main([*argv, "--out", str(out)]) == 0
    assert "run(s) to train" not in capsys.readouterr().out  # everything came from results.jsonl
    assert (out / "trials" / ".gitignore").read_text().strip() == "*"


OPTIMIZERS = {
    "adafactor_v2": {"wd_rule": "independent", "name": "adafactor_v2", "lr": 1.0e-2, "weight_decay": 1.0e-4, "weight_decay_mode": "independent",
                     "args": {"preset": "adafactor_v2"}},
    "muon_v2": {"wd_rule": "mup", "name": "muon_v2", "lr": 3.0e-3, "weight_decay": 0.1, "weight_decay_mode": "coupled",
                "args": {"adjust": "rms", "fallback_betas": [0.9, 0.95]}},
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_other_optimizers_plan_and_train_a_proxy_trial(tmp_path, name):
    """The search is optimizer-agnostic: Adafactor's and Muon's recipes plan (wd tuned where the muP rule allows) and
    a proxy trial trains through hf-optim train."""
    from hf_optim.runner._mutransfer_trials import Trial, run_one

    optimizer = dict(OPTIMIZERS[name])
    mup = {"base_width": 32, "wd_rule": optimizer.pop("wd_rule")}
    recipe = dict(TINY, optimizer=optimizer, model={**TINY["model"], "mup": mup})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    target = plan.load_target(str(path))
    assert target.tunes_weight_decay and "weight_decay" in plan.planned_runs(target, 5, 1)
    proxy = plan.proxy_shape(target, None, None)
    trial = Trial("proxy", "lr", proxy, math.log2(target.lr), 2.0, 1.0, target.weight_decay, seed=0)
    row = run_one(str(path), trial, tmp_path / "trial", plan.run_flops(target, proxy))
    assert not row["diverged"] and math.isfinite(row["val_loss"]) and row["width"] == 32
    history = json.loads((tmp_path / "trial" / "metrics.json").read_text())["summary"]
    assert history["peak_lr"] == pytest.approx(target.lr)  # the trial's override reached the optimizer


def _committed_rows(folder: Path = EXAMPLE) -> list[dict]:
    """The rows of an example's results.jsonl that ``folder``'s report was computed from (the width example's file
    holds both of its runs: x2 resolution in the folder itself, the earlier half-step search in half_step/)."""
    used = set(json.loads((folder / "report.json").read_text())["settings"]["runs"])
    results = folder / "results.jsonl" if (folder / "results.jsonl").exists() else EXAMPLE / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    assert used <= {row["key"] for row in rows}
    return [row for row in rows if row["key"] in used]


@pytest.mark.parametrize("folder", [EXAMPLE, EXAMPLE / "half_step", DEPTH_EXAMPLE], ids=["x2", "half_step", "depth"])
def test_committed_report_is_recomputed_from_its_results(folder):
    report = json.loads((folder / "report.json").read_text())
    recomputed = search.summarize(_committed_rows(folder), report["settings"]["stages"])
    assert json.loads(json.dumps({**recomputed, "settings": report["settings"]})) == report
    assert (folder / "report.md").read_text() == mutransfer.report.markdown(report)


def test_committed_half_step_is_worse_at_the_target_than_both_x2_neighbours_in_every_seed():
    """Why the default resolution is x2: the proxy's half-step optimum 2^-7.5 lost to 2^-8 and 2^-7 at width 512."""
    rows = [r for r in _committed_rows(EXAMPLE / "half_step") if r["role"] in ("direct", "verify")]
    loss = {(r["log2_lr"], r["seed"]): r["val_loss"] for r in rows}
    for seed in (0, 1, 2):
        assert loss[(-7.5, seed)] > max(loss[(-8.0, seed)], loss[(-7.0, seed)])


@pytest.mark.parametrize(
    ("folder", "target", "proxy"),
    [(EXAMPLE, (512, 2), (64, 2)), (DEPTH_EXAMPLE, (256, 8), (64, 2))],
    ids=["width", "depth"],
)
def test_committed_example_meets_the_acceptance(folder, target, proxy):
    """Proxy width 64 -> target 512, and 64 x 2 layers -> 256 x 8 layers under CompleteP: transferred lr within one
    x2 step of the direct sweep's best, at <= 25 % of its FLOPs, and tuned.yaml trained by plain hf-optim train within
    0.01 of the direct sweep's best loss."""
    report = search.summarize(
        _committed_rows(folder), json.loads((folder / "report.json").read_text())["settings"]["stages"]
    )
    assert report["direct"]["transfer_gap_grid_steps"] <= 1
    assert report["compute"]["proxy_over_direct_flops"] <= 0.25
    assert report["verify"]["tuned_minus_direct_best"] <= 0.01
    tuned = schema.load(folder / "tuned.yaml")
    assert (tuned["model"]["hidden_size"], tuned["model"]["num_layers"]) == target
    provenance = tuned["provenance"]["proxy"]
    assert (provenance["width"], provenance["layers"]) == proxy
    if target[1] != proxy[1]:  # the depth transfer runs under CompleteP
        assert tuned["model"]["mup"]["base_depth"] == proxy[1] and tuned["model"]["mup"]["depth_alpha"] == 1.0


@pytest.mark.slow
def test_committed_tuned_recipe_trains_under_accelerate_launch(tmp_path):
    accelerate = shutil.which("accelerate", path=str(BIN)) or "accelerate"
    cmd = [
        accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", str(_launch.free_port()),
        "--config_file", str(ROOT / "recipes/accelerate/ddp.yaml"), "-m", "hf_optim.runner.train",
        str(EXAMPLE / "tuned.yaml"), "run.max_steps=2", "model.hidden_size=128", "model.intermediate_size=256",
        "--output-dir", str(tmp_path / "ddp"),
    ]  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}  # fmt: skip
    result = _launch.run(cmd, timeout=300, env=env, cwd=ROOT)
    assert result.returncode == 0, result.tail()
    summary = json.loads((tmp_path / "ddp" / "metrics.json").read_text())["summary"]
    assert summary["world_size"] == 2 and summary["steps"] == 2 and math.isfinite(summary["final_eval_loss"])
