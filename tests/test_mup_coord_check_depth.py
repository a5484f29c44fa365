"""Depth coordinate check: CompleteP and depth-µP keep the residual stream and its updates flat in depth, width-only
muP does not (the pattern of Dey et al. 2025, arXiv 2505.01618, Figure 7)."""

from __future__ import annotations

import csv

import pytest

from mup_integration import coord_check_depth as ccd

DEPTHS = (2, 8, 32)
STEPS = 4


@pytest.fixture(scope="module")
def records():
    # width 32, 4 Adam steps at lr 3e-3 on 4 x 32 byte-tokens, base depth 2: ~15 s on one core
    return ccd.coord_check_depth(DEPTHS, width=32, steps=STEPS, lr=3e-3, batch_size=4, seq_len=32)


@pytest.mark.parametrize("parametrization", ["completep", "depth_mup"])
def test_depth_scaling_keeps_the_residual_stream_and_its_updates_flat(records, parametrization):
    # Measured here (seed 0): worst max/min over depths 2, 8, 32 and steps 1..3 = 1.71x (CompleteP, residual update),
    # 1.63x (depth-µP); width-only muP's residual and its update grow 7.6x and 8.5x from depth 2 to 32.
    for step in range(1, STEPS):
        for quantity in ("residual", "residual_update", "logits_update"):
            assert ccd.depth_spread(records, parametrization, quantity, step) < 2.0, (quantity, step)


def test_width_only_mup_residual_stream_grows_with_depth(records):
    for quantity in ("residual", "residual_update"):
        assert ccd.depth_growth(records, "mup", quantity, STEPS - 1) > 4.0, quantity


def test_base_depth_is_the_same_model_for_every_parametrization(records):
    # at L = L0 every depth factor is 1: the three parametrizations train the identical model
    for quantity in ccd.QUANTITIES:
        for step in range(STEPS):
            values = {p: ccd.by_depth(records, p, quantity, step)[2] for p in ccd.DEPTH_PARAMETRIZATIONS}
            assert values["mup"] == values["depth_mup"] == values["completep"], (quantity, step)


def test_cli_writes_csv_and_png(tmp_path, capsys):
    from hf_optim.cli import main

    rc = main(
        [
            "coord-check",
            "--depths",
            "1,2",
            "--width",
            "16",
            "--steps",
            "2",
            "--seq-len",
            "8",
            "--batch-size",
            "2",
            "--model",
            "gpt2",
            "--out-dir",
            str(tmp_path),
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "coord-check completep depth=  2" in out and "deepest/shallowest" in out
    rows = list(csv.DictReader((tmp_path / "coord_check_depth.csv").read_text().splitlines()))
    assert len(rows) == 3 * 2 * 2 * len(ccd.QUANTITIES)  # parametrizations x depths x steps x quantities
    assert (tmp_path / "coord_check_depth.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv", [["--depths", "2,x"], ["--depths", "0,2"], ["--depths", "2", "--width", "0"]])
def test_cli_refuses_bad_depths(argv, capsys):
    from hf_optim.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["coord-check", *argv])
    assert exc.value.code == 2 and "--depths" in capsys.readouterr().err


def test_bad_parametrization():
    with pytest.raises(ValueError, match="parametrizations must be one of"):
        ccd.coord_check_depth((2, 4), parametrizations=("sp",))
