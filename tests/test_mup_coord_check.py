"""Coordinate check on a small LLaMA: muP keeps hidden activations flat across widths 64..1024, SP does not."""

from __future__ import annotations

import csv

import pytest

from mup_integration import coord_check as cc

WIDTHS = (64, 128, 256, 512, 1024)
STEPS = 4


@pytest.fixture(scope="module")
def records():
    # 2 layers, 4 sequences of 32 byte-tokens, 4 Adam steps at lr 3e-3 (muP base width 64): ~15 s on one core.
    return cc.coord_check(WIDTHS, steps=STEPS, lr=3e-3, batch_size=4, seq_len=32, num_layers=2)


def hidden_modules(records):
    return sorted({r.module for r in records if r.module.startswith("layer")})


def test_mup_hidden_activations_stay_within_2x_across_widths(records):
    # Measured: max over modules and steps of max/min across widths = 1.65 (layer1.mlp, step 3); the spread is
    # non-monotonic in width (finite-width noise at 64), so 2x separates "flat" from any real growth law.
    for step in range(STEPS):
        for module in hidden_modules(records):
            assert cc.spread(records, "mup", module, step) < 2.0, (module, step)


def test_sp_hidden_activations_grow_more_than_4x(records):
    # Measured: smallest growth 1024 vs 64 among hidden modules = 11.7x at init (constant-std HF init), 42x at step 3.
    for step in (0, STEPS - 1):
        for module in hidden_modules(records):
            assert cc.growth(records, "sp", module, step) > 4.0, (module, step)


def test_cli_writes_csv_and_png(tmp_path, capsys):
    from hf_optim.cli import main

    rc = main(
        [
            "coord-check",
            "--widths",
            "32,64",
            "--steps",
            "2",
            "--seq-len",
            "8",
            "--batch-size",
            "2",
            "--out-dir",
            str(tmp_path),
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "coord-check mup width=   64" in out and "wrote" in out
    with open(tmp_path / "coord_check.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * 2 * 2 * 8  # parametrizations x widths x steps x (embed, 2 x (attn, mlp, block), logits)
    assert set(rows[0]) == {"parametrization", "width", "step", "module", "mean_abs"}
    assert (tmp_path / "coord_check.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gpt2_runs():
    recs = cc.run_one("mup", 64, base_width=32, model="gpt2", steps=1, seq_len=8, batch_size=2)
    assert {r.module for r in recs} >= {"embed", "layer0.attn", "layer1.mlp", "logits"}


def test_bad_parametrization():
    with pytest.raises(ValueError, match="parametrizations must be one of"):
        cc.coord_check((32,), parametrizations=("ntk",))
