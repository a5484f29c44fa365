"""`hf-optim sweep` tuning muP's base multipliers (output_mult, attn_mult, init_std) at the base width and
transferring them with the lr (Tensor Programs V, Fig. 4): config axes, the cells' models, the analysis by hand, and
the committed width experiment (docs/experiments/width_transfer) against issue 15's threshold."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from hf_optim.runner._sweep_config import load_config
from hf_optim.runner._sweep_multipliers import plot_multiplier_transfer, transfer, tuning
from hf_optim.runner._sweep_summary import summarize

EXPERIMENTS = Path(__file__).parent.parent / "docs" / "experiments"
TINY = """
name: tiny_mults
model: {layers: 1, head_dim: 16, ffn_mult: 2, seq_len: 16, batch_size: 4, base_width: 32}
train: {steps: 3, warmup_steps: 1, eval_batches: 1}
grids:
  - name: tune
    width: [32]
    log2_lr: [-8, -6]
    parametrization: [mup]
    output_mult: [1, 4]
    attn_mult: [0.5, 1, 2]
    init_std: [0.02]
"""


def _write(tmp_path: Path, text: str = TINY) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(text)
    return path


def test_multiplier_axes_expand_every_combination(tmp_path):
    cells = load_config(_write(tmp_path)).cells
    assert len(cells) == 2 * 3 * 2
    combos = {(c.model.output_mult, c.model.attn_mult, c.model.init_std) for c in cells}
    assert combos == {(o, a, 0.02) for o in (1.0, 4.0) for a in (0.5, 1.0, 2.0)}
    assert len({c.key for c in cells}) == len(cells)
    # at the default multipliers the cell is the one a config without the axes gives (same key, same results)
    plain = load_config(_write(tmp_path, TINY.replace("output_mult: [1, 4]", "").replace("attn_mult: [0.5, 1, 2]", "")))
    default = {c.key for c in cells if (c.model.output_mult, c.model.attn_mult) == (1.0, 1.0)}
    assert default == {c.key for c in plain.cells}
    assert "output_mult=4 attn_mult=0.5" in next(c for c in cells if c.model.output_mult == 4).describe()


@pytest.mark.parametrize(
    "edit, message",
    [
        (("parametrization: [mup]", "parametrization: [sp, mup]"), "muP plan constants; parametrization 'sp'"),
        (("width: [32]", "width: [32, 64]"), "varies the width or depth, or the multipliers"),
        (("output_mult: [1, 4]", "output_mult: [0, 4]"), "output_mult must be > 0"),
        (("attn_mult: [0.5, 1, 2]", "attn_mult: [0.5, one]"), "attn_mult must be a finite number"),
        (("init_std: [0.02]", "init_std: []"), "'init_std' must be a non-empty list"),
        (("output_mult: [1, 4]", "output_multiplier: [1, 4]"), "Did you mean 'output_mult'"),
    ],
)
def test_bad_multiplier_axes_name_the_problem(tmp_path, edit, message):
    with pytest.raises(ValueError, match=message):
        load_config(_write(tmp_path, TINY.replace(*edit)))


def test_sp_grid_may_vary_init_std(tmp_path):
    text = TINY.replace("parametrization: [mup]", "parametrization: [sp]").replace("    output_mult: [1, 4]\n", "")
    text = text.replace("    attn_mult: [0.5, 1, 2]\n", "").replace("init_std: [0.02]", "init_std: [0.01, 0.04]")
    assert {c.model.init_std for c in load_config(_write(tmp_path, text)).cells} == {0.01, 0.04}


def test_cells_build_models_with_their_multipliers(tmp_path):
    """output_mult scales the logits exactly (same init, readout input x output_mult / m); attn_mult reaches the
    plan and changes the function; init_std is the base sigma (hidden matrices' std = init_std / sqrt(m))."""
    import mup_integration as mi
    from hf_optim.runner._sweep_cell import build_model

    text = TINY.replace("width: [32]", "width: [64]").replace("init_std: [0.02]", "init_std: [0.02, 0.05]")
    cells = {
        (c.model.output_mult, c.model.attn_mult, c.model.init_std): c
        for c in load_config(_write(tmp_path, text)).cells
        if c.lr == 2.0**-8
    }
    x = torch.randint(0, 60, (2, 16))
    with torch.no_grad():
        logits = {k: build_model(c)(input_ids=x).logits.double() for k, c in cells.items()}
    torch.testing.assert_close(logits[(4.0, 1.0, 0.02)], 4.0 * logits[(1.0, 1.0, 0.02)], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(logits[(1.0, 2.0, 0.02)], logits[(1.0, 1.0, 0.02)], atol=1e-4)
    plan = mi.get_plan(build_model(cells[(4.0, 2.0, 0.02)]))
    assert (plan.output_mult, plan.attn_mult, plan.width_mult) == (4.0, 2.0, 2.0)
    wide = build_model(cells[(1.0, 1.0, 0.05)])
    std = wide.model.layers[0].mlp.up_proj.weight.std().item()
    assert std == pytest.approx(0.05 / math.sqrt(2.0), rel=0.05)


def _row(grid: str, param: str, width: int, lr_exp: int, mults: tuple, loss: float, seed: int = 0) -> dict:
    out, attn, std = mults
    return {
        "key": f"{grid}-{param}-{width}-{lr_exp}-{mults}-{seed}",
        "grid": grid,
        "parametrization": param,
        "width": width,
        "lr": 2.0**lr_exp,
        "weight_decay_mode": "coupled",
        "weight_decay": 0.0,
        "seed": seed,
        "val_loss": loss,
        "optimizer": "adamw_v2",
        "settings": {"model": {"layers": 1, "output_mult": out, "attn_mult": attn, "init_std": std}},
    }


def test_tuning_and_transfer_by_hand(tmp_path):
    """A made-up surface whose answers are known: at width 64 the best cell is output 4, attn 1, std 0.02 at 2^-8
    (seed mean 2.0); the transfer grid at output 4 scores 1.8 at width 256 at 2^-8; SP's best at 256 is 1.9 at
    2^-9, muP with default multipliers at its base-tuned lr (2^-7) scores 2.05 at 256."""
    d = 0.02
    rows = [
        _row("tune", "mup", 64, -8, (4.0, 1.0, d), 1.9, seed=0),
        _row("tune", "mup", 64, -8, (4.0, 1.0, d), 2.1, seed=1),
        _row("tune", "mup", 64, -7, (4.0, 1.0, d), 2.3),
        _row("tune", "mup", 64, -8, (1.0, 1.0, d), 2.4),
        _row("tune", "mup", 64, -7, (1.0, 1.0, d), 2.2),
        _row("tune", "mup", 64, -8, (4.0, 2.0, d), 2.5),
        _row("tune", "mup", 64, -7, (4.0, 2.0, d), math.nan),  # diverged: never the best, left out of spreads
        _row("tune", "mup", 64, -8, (1.0, 2.0, d), 2.6),
        _row("xfer", "mup", 64, -8, (4.0, 1.0, d), 2.0),
        _row("xfer", "mup", 256, -8, (4.0, 1.0, d), 1.8),
        _row("xfer", "mup", 256, -9, (4.0, 1.0, d), 1.85),
        _row("wt", "sp", 256, -9, (1.0, 1.0, d), 1.9),
        _row("wt", "sp", 256, -8, (1.0, 1.0, d), 1.95),
        _row("wt", "sp", 64, -8, (1.0, 1.0, d), 2.3),
        _row("wt", "mup", 256, -7, (1.0, 1.0, d), 2.05),
        _row("wt", "mup", 64, -7, (1.0, 1.0, d), 2.2),
    ]
    (tuned,) = tuning(rows)
    assert tuned["grid"] == "tune" and tuned["combinations"] == 4
    assert tuned["best"] == {"output_mult": 4.0, "attn_mult": 1.0, "init_std": d, "log2_lr": -8.0, "loss": 2.0}
    assert tuned["default"] == {"output_mult": 1.0, "attn_mult": 1.0, "init_std": d, "log2_lr": -7.0, "loss": 2.2}
    assert tuned["around_best"] == {"output_mult": {"1": 2.2, "4": 2.0}, "attn_mult": {"1": 2.0, "2": 2.5}}
    assert tuned["spread_around_best"] == pytest.approx({"output_mult": 0.2, "attn_mult": 0.5})
    (entry,) = transfer(rows)
    assert (entry["tuning_grid"], entry["transfer_grid"], entry["largest_width"]) == ("tune", "xfer", 256)
    assert entry["loss_at_transferred_lr"] == {"64": 2.0, "256": 1.8}
    assert entry["best_log2_lr"] == {"64": -8.0, "256": -8.0}
    assert entry["sp_tuned_at_largest_width"] == {"log2_lr": -9.0, "loss": 1.9}
    assert entry["margin_vs_sp"] == pytest.approx(0.1)
    assert entry["default_multipliers_at_their_transferred_lr"] == {"log2_lr": -7.0, "loss": 2.05}
    # a grid that mixes other multipliers in is not a transfer of the tuned ones
    assert transfer([*rows, _row("xfer", "mup", 128, -8, (2.0, 1.0, d), 1.9)]) == []
    (png,) = plot_multiplier_transfer(rows, tmp_path)
    assert png.name == "xfer_adamw_v2_multipliers.png" and png.stat().st_size > 0


# ---- the committed experiment (docs/experiments/width_transfer, docs/experiments/README.md section 1b) -----------
def _committed() -> tuple[list[dict], dict]:
    log = EXPERIMENTS / "width_transfer" / "results.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    keys = {c.key for c in load_config("full_width_transfer").cells}
    assert keys <= {r["key"] for r in rows}  # every cell of the config ran
    rows = [r for r in rows if r["key"] in keys]
    summary = summarize(rows)
    committed = json.loads((EXPERIMENTS / "width_transfer" / "summary.json").read_text())
    for part in ("multiplier_tuning", "multiplier_transfer"):
        assert json.loads(json.dumps(summary[part])) == committed[part], f"summary.json is stale ({part})"
    return rows, summary


def test_committed_transfer_grid_uses_the_multipliers_tuned_at_the_base_width():
    """The transfer grid's multipliers and lr are the joint arg-min of the tuning grid, recomputed here from the
    per-run log (seed means, a diverged seed counts as infinite)."""
    rows, summary = _committed()
    scores: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        if r["grid"] == "mup_multipliers":
            m = r["settings"]["model"]
            loss = r["val_loss"] if r["val_loss"] is not None and math.isfinite(r["val_loss"]) else math.inf
            scores[(m["output_mult"], m["attn_mult"], m["init_std"], math.log2(r["lr"]))].append(loss)
    best = min(scores, key=lambda k: (sum(scores[k]) / len(scores[k]), k))
    (entry,) = summary["multiplier_transfer"]
    assert (*entry["multipliers"].values(), entry["transferred_log2_lr"]) == best
    xfer = [r for r in rows if r["grid"] == entry["transfer_grid"]]
    assert {r["width"] for r in xfer} == {64, 128, 256, 512}
    assert all(
        (r["settings"]["model"]["output_mult"], r["settings"]["model"]["attn_mult"], r["settings"]["model"]["init_std"])
        == best[:3]
        for r in xfer
    )


def test_committed_tuned_mup_at_the_largest_width_matches_or_beats_sp_tuned_there():
    """Issue 15, item 6: with every multiplier and the lr tuned at width 64 and transferred, muP at width 512 scores
    at least as well as SP with its lr tuned at width 512 (both seed means of the committed runs)."""
    rows, summary = _committed()
    (entry,) = summary["multiplier_transfer"]
    assert entry["largest_width"] == 512
    sp = defaultdict(list)
    for r in rows:
        if r["grid"] == "width_transfer" and r["parametrization"] == "sp" and r["width"] == 512:
            sp[r["lr"]].append(r["val_loss"])
    sp_best = min(sum(v) / len(v) for v in sp.values())
    mup = [
        r["val_loss"]
        for r in rows
        if r["grid"] == entry["transfer_grid"]
        and r["width"] == 512
        and math.log2(r["lr"]) == entry["transferred_log2_lr"]
    ]
    assert len(mup) == 2
    assert sum(mup) / len(mup) <= sp_best, (sum(mup) / len(mup), sp_best)
