"""`hf-optim sweep` with a depth axis: config expansion, depth-scaled cells, the depth-transfer analysis by hand and
the committed depth-transfer experiment (docs/experiments/depth_transfer) against its acceptance thresholds."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest

from hf_optim.runner import sweep
from hf_optim.runner._sweep_config import load_config
from hf_optim.runner._sweep_depth import depth_transfer
from hf_optim.runner._sweep_summary import summarize

EXPERIMENTS = Path(__file__).parent.parent / "docs" / "experiments"
TINY = """
name: tiny_depth
model: {layers: 2, head_dim: 16, ffn_mult: 2, seq_len: 16, batch_size: 4, base_width: 32, base_depth: 1}
train: {steps: 4, warmup_steps: 1, eval_batches: 1}
grids:
  - name: dt
    width: [32]
    depth: [1, 3]
    log2_lr: [-8, -6]
    parametrization: [mup, depth_mup, completep]
"""


def _write(tmp_path: Path, text: str = TINY) -> Path:
    path = tmp_path / "tiny_depth.yaml"
    path.write_text(text)
    return path


def test_depth_axis_expands_layers_and_keeps_old_keys(tmp_path):
    cells = load_config(_write(tmp_path)).cells
    assert len(cells) == 2 * 2 * 3
    assert sorted({c.model.layers for c in cells}) == [1, 3] and {c.model.base_depth for c in cells} == {1}
    assert "L=3" in next(c for c in cells if c.model.layers == 3).describe()
    # configs without base_depth keep the keys of the committed width sweeps (base_depth left out of the key)
    width = load_config("full_width_transfer").cells
    committed = {
        json.loads(line)["key"]
        for line in (EXPERIMENTS / "width_transfer" / "results.jsonl").read_text().splitlines()
        if line.strip()
    }
    assert {c.key for c in width} <= committed


@pytest.mark.parametrize(
    "edit, message",
    [
        (("base_depth: 1}", "base_depth: null}"), "need model.base_depth"),
        (("width: [32]", "width: [32, 64]"), "varies width or depth, not both"),
        (("depth: [1, 3]", "depth: [0, 3]"), "depth must be >= 1"),
        (("depth: [1, 3]", "depth: [1, 2.5]"), "depth must be an integer"),
        (("parametrization: [mup, depth_mup, completep]", "parametrization: [complete_p]"), "Did you mean 'completep'"),
        (("base_depth: 1}", "base_depth: 0}"), "model.base_depth must be >= 1 or null"),
    ],
)
def test_bad_depth_config_names_the_problem(tmp_path, edit, message):
    with pytest.raises(ValueError, match=message):
        load_config(_write(tmp_path, TINY.replace(*edit)))


def test_depth_cells_build_depth_scaled_models_and_groups(tmp_path):
    import mup_integration as mi
    from hf_optim.runner._sweep_cell import build_model, build_optimizer

    cell = next(
        c
        for c in load_config(_write(tmp_path)).cells
        if c.parametrization == "depth_mup" and c.model.layers == 3 and c.lr == 2.0**-8
    )
    model = build_model(cell)
    plan = mi.get_plan(model)
    assert (plan.base_depth, plan.depth, plan.depth_alpha) == (1, 3, 0.5) and mi.is_mup_applied(model)
    optimizer = build_optimizer(model, cell)
    group = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    q = group[id(model.model.layers[0].self_attn.q_proj.weight)]
    norm = group[id(model.model.layers[2].input_layernorm.weight)]
    embed = group[id(model.model.embed_tokens.weight)]
    # width_mult 1 here; depth m_L = 3: block lr x 3^(0.5 - 1), block eps x 3^-0.5 (CompleteP Table 1, alpha = 0.5)
    assert q["lr"] == pytest.approx(2.0**-8 * 3**-0.5, rel=1e-12) and norm["lr"] == q["lr"]
    assert q["eps"] == pytest.approx(cell.train.eps * 3**-0.5, rel=1e-12)
    assert embed["lr"] == 2.0**-8 and embed["eps"] == cell.train.eps


@pytest.mark.slow
def test_tiny_depth_sweep_end_to_end(tmp_path):
    out = tmp_path / "out"
    summary = sweep.run_sweep(str(_write(tmp_path)), out, jobs=1, log=lambda *a, **k: None)
    entries = {e["parametrization"]: e for e in summary["depth_transfer"]}
    assert set(entries) == {"mup", "depth_mup", "completep"}
    # at the base depth the three parametrizations are the same model: identical losses at every lr
    assert (
        entries["mup"]["best_loss"]["1"]
        == entries["depth_mup"]["best_loss"]["1"]
        == entries["completep"]["best_loss"]["1"]
    )
    assert (out / "dt_adamw_v2_w32_depth.png").read_bytes()[:4] == b"\x89PNG"
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert "layers" in header


def _row(param, layers, lr, loss, seed=0):
    return {
        "grid": "g",
        "parametrization": param,
        "width": 64,
        "lr": lr,
        "weight_decay": 0.0,
        "weight_decay_mode": "coupled",
        "seed": seed,
        "val_loss": loss,
        "settings": {"model": {"layers": layers}},
    }


def test_depth_summary_by_hand():
    lrs = [2.0**k for k in range(-10, -5)]  # grid indices 0..4
    rows = []
    # depth 2: best at 2^-7 (index 3); depth 16: best at 2^-9 (index 1) -> shift -2; 2^-7 at depth 16 scores 2.9
    for lr, loss2, loss16 in zip(lrs, [3.0, 2.8, 2.6, 2.5, 2.7], [2.7, 2.4, 2.6, 2.9, float("nan")]):
        rows += [_row("mup", 2, lr, loss2, s) for s in (0, 1)]
        rows += [_row("mup", 16, lr, loss16, s) for s in (0, 1)]
    rows.append(_row("mup", 4, 2.0**-7, 2.0))  # a single depth-4 cell: its best is the only lr it has
    (entry,) = depth_transfer(rows)
    assert entry["best_log2_lr"] == {"2": -7.0, "4": -7.0, "16": -9.0}
    assert entry["shift_grid_steps"] == -2
    assert entry["transferred_log2_lr"] == -7.0
    assert entry["loss_at_transferred_lr"] == {"2": 2.5, "4": 2.0, "16": 2.9}
    assert entry["optimum_on_grid_edge"] == {"2": False, "4": False, "16": False}
    # a diverged seed makes its cell's mean inf: depth 16's best moves to the next-best lr (2^-8, index 2)
    diverged = [
        r
        if (r["settings"]["model"]["layers"], r["lr"], r["seed"]) != (16, 2.0**-9, 1)
        else {**r, "val_loss": float("nan")}
        for r in rows[:-1]
    ]
    (entry,) = depth_transfer(diverged)
    assert entry["best_log2_lr"]["16"] == -8.0 and entry["shift_grid_steps"] == -1
    assert math.isinf(entry["loss_at_transferred_lr"]["16"]) is False and entry["loss_at_transferred_lr"]["16"] == 2.9


# ---- the committed experiment (docs/experiments/depth_transfer, docs/experiments/README.md section 4) -------------
def _committed_entries(name: str = "depth_transfer", grid: str | None = None) -> dict[str, dict]:
    """The depth-transfer entries of grid ``grid`` (default: the grid named like the sweep) of sweep ``name`` (results
    in docs/experiments/<name>), recomputed from the committed per-run log (only the config's cells, as the sweep
    does) and checked against the committed summary.json, by parametrization."""
    log = EXPERIMENTS / name / "results.jsonl"
    if not log.exists():
        pytest.skip(f"{log} not committed")
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    keys = {c.key for c in load_config(name).cells}
    assert {r["key"] for r in rows} == keys  # every cell of the config ran, and nothing else is in the log
    summary = summarize(rows)
    committed = json.loads((EXPERIMENTS / name / "summary.json").read_text())
    assert json.loads(json.dumps(summary["depth_transfer"])) == committed["depth_transfer"], "summary.json is stale"
    return {e["parametrization"]: e for e in summary["depth_transfer"] if e["grid"] == (grid or name)}


def test_committed_depth_transfer_completep_meets_acceptance():
    """Issue 15: under CompleteP the best lr moves at most one grid step (x2) from the shallowest to the deepest
    model, every optimum is inside the lr grid, and the deepest model is better than the shallowest at the
    transferred lr (the shallowest depth's best)."""
    entries = _committed_entries()
    for param in ("completep", "depth_mup"):
        entry = entries[param]
        depths = sorted(entry["best_log2_lr"], key=int)
        assert abs(entry["shift_grid_steps"]) <= 1, (param, entry["best_log2_lr"])
        assert not any(entry["optimum_on_grid_edge"].values()), (param, entry["best_log2_lr"])
        at = entry["loss_at_transferred_lr"]
        assert at[depths[-1]] < at[depths[0]], (param, at)


def test_committed_depth_transfer_base_depth_is_one_model():
    """At the base depth the three parametrizations are the same model: identical losses (a check of the runs)."""
    entries = _committed_entries()
    base = min(entries["mup"]["best_log2_lr"], key=int)
    assert (
        entries["mup"]["best_loss"][base]
        == entries["depth_mup"]["best_loss"][base]
        == entries["completep"]["best_loss"][base]
    )


def test_committed_depth_transfer_width_only_mup_loses_depth_at_the_transferred_lr():
    """What the CPU-scale run does show for width-only muP: at the transferred lr the deeper models are worse, each
    doubling of depth (the opposite of CompleteP's)."""
    entry = _committed_entries()["mup"]
    at = [entry["loss_at_transferred_lr"][d] for d in sorted(entry["loss_at_transferred_lr"], key=int)]
    assert all(a < b for a, b in itertools.pairwise(at)), at


@pytest.mark.xfail(
    strict=True,
    reason="too short to show it: at 80 steps the deep width-only muP models sit on a flat loss plateau and their "
    "best lr does not move 2 grid steps (docs/experiments/README.md §4; §4c shows the shift at 1650 steps)",
)
def test_committed_depth_transfer_width_only_mup_shift_at_least_two_steps():
    entry = _committed_entries()["mup"]
    assert abs(entry["shift_grid_steps"]) >= 2 and not any(entry["optimum_on_grid_edge"].values())


# ---- the long-horizon run (docs/experiments/depth_transfer_long, docs/experiments/README.md section 4b) -----------
def test_committed_long_depth_transfer_completep_meets_acceptance():
    """Issue 15 at 800 steps and depths 1-64: under CompleteP the best lr moves at most one grid step from the
    shallowest to the deepest model, no optimum is on the edge of the lr grid, and every deeper model is better than
    the shallower one at the transferred lr."""
    entry = _committed_entries("depth_transfer_long")["completep"]
    assert abs(entry["shift_grid_steps"]) <= 1, entry["best_log2_lr"]
    assert not any(entry["optimum_on_grid_edge"].values()), entry["best_log2_lr"]
    at = [entry["loss_at_transferred_lr"][d] for d in sorted(entry["loss_at_transferred_lr"], key=int)]
    assert all(a > b for a, b in itertools.pairwise(at)), at


def test_committed_long_depth_transfer_base_depth_is_one_model():
    entries = _committed_entries("depth_transfer_long")
    assert entries["mup"]["best_loss"]["1"] == entries["completep"]["best_loss"]["1"]


@pytest.mark.xfail(
    strict=True,
    reason="too short to show it: at 800 steps (0.08 characters per parameter at depth 64) the width-only muP "
    "optimum moves by less than 2 grid steps (docs/experiments/README.md §4b; §4c shows the shift at 1650 steps)",
)
def test_committed_long_depth_transfer_width_only_mup_shift_at_least_two_steps():
    entry = _committed_entries("depth_transfer_long")["mup"]
    assert abs(entry["shift_grid_steps"]) >= 2 and not any(entry["optimum_on_grid_edge"].values())


def test_committed_long_depth_transfer_tuned_multipliers_carry_to_depth():
    """Issue 15 item 6 across depth: CompleteP's output and attention multipliers tuned with the lr at depth 1
    (grid completep_multipliers) and carried, with that lr, to depth 64 (grid completep_tuned_transfer): the transfer
    grid uses the committed optimum, its lr moves at most one grid step, deeper is better at the transferred lr at
    every depth, and at the deepest depth the tuned model beats CompleteP with the default multipliers at its best."""
    summary = json.loads((EXPERIMENTS / "depth_transfer_long" / "summary.json").read_text())
    (tuned,) = [t for t in summary["multiplier_tuning"] if t["grid"] == "completep_multipliers"]
    carried = {
        (c.model.output_mult, c.model.attn_mult)
        for c in load_config("depth_transfer_long").cells
        if c.grid == "completep_tuned_transfer"
    }
    assert carried == {(tuned["best"]["output_mult"], tuned["best"]["attn_mult"])}
    assert tuned["best"]["loss"] < tuned["default"]["loss"]

    entry = _committed_entries("depth_transfer_long", "completep_tuned_transfer")["completep"]
    default = _committed_entries("depth_transfer_long")["completep"]
    assert entry["transferred_log2_lr"] == tuned["best"]["log2_lr"]
    assert abs(entry["shift_grid_steps"]) <= 1 and not any(entry["optimum_on_grid_edge"].values())
    depths = sorted(entry["loss_at_transferred_lr"], key=int)
    at = [entry["loss_at_transferred_lr"][d] for d in depths]
    assert all(a > b for a, b in itertools.pairwise(at)), at
    assert at[-1] < default["best_loss"][depths[-1]], (at[-1], default["best_loss"])
