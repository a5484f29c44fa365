"""The committed probe of depth transfer with deep models trained for 10-20 characters per parameter
(docs/experiments/depth_transfer_probe, docs/experiments/README.md section 4c): provenance of every row, and the
statements the write-up makes, recomputed from the rows."""

from __future__ import annotations

import itertools
import json
import math
from collections import defaultdict
from pathlib import Path

import pytest

from hf_optim.runner._sweep_config import load_config

PROBE = Path(__file__).parent.parent / "docs" / "experiments" / "depth_transfer_probe"
HORIZON = 1650  # steps at every depth of the comparison (the depth-16 model's 20 characters per parameter)


def _rows() -> list[dict]:
    return [json.loads(line) for line in (PROBE / "results.jsonl").read_text().splitlines() if line.strip()]


def _curves(parametrization: str) -> dict[int, dict[float, list[float]]]:
    """``{depth: {log2 lr: [final val loss per seed]}}`` of the fixed-horizon runs, pooled over the per-depth grids."""
    out: dict[int, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in _rows():
        if r["parametrization"] == parametrization and r["settings"]["train"]["steps"] == HORIZON:
            assert not r["diverged"], r["key"]
            out[r["settings"]["model"]["layers"]][math.log2(r["lr"])].append(r["val_loss"])
    return out


def _mean(curve: dict[float, list[float]]) -> dict[float, float]:
    return {lr: sum(losses) / len(losses) for lr, losses in curve.items()}


def _best(curve: dict[float, list[float]]) -> float:
    means = _mean(curve)
    return min(means, key=means.get)


def test_every_committed_row_comes_from_a_committed_run_and_every_run_is_committed():
    as_run = {c.key for path in sorted(PROBE.glob("run*.yaml")) for c in load_config(path).cells}
    committed = [r["key"] for r in _rows()]
    assert len(committed) == len(set(committed)) and set(committed) == as_run


def test_the_bundled_config_is_the_union_of_the_runs_plus_the_seeds_still_to_run():
    bundled = load_config("depth_transfer_probe").cells
    fixed_horizon = {r["key"] for r in _rows() if r["settings"]["train"]["steps"] == HORIZON and r["grid"] != "d1"}
    assert fixed_horizon <= {c.key for c in bundled}  # resuming in place skips every committed run
    assert {c.seed for c in bundled} == {0, 1}


def test_every_deep_optimum_is_bracketed():
    for parametrization in ("mup", "completep"):
        for depth in (16, 32):
            curve = _mean(_curves(parametrization)[depth])
            assert min(curve) < _best(_curves(parametrization)[depth]) < max(curve), (parametrization, depth, curve)


def test_width_only_mup_optimum_drifts_down_with_depth():
    """Section 4c: the width-only best lr never rises with depth and is lower at depth 32 than at depth 2; the loss
    paid at 2^-4 grows with depth (within 0.01 of the best at depth 2, above 0.3 at depth 16)."""
    curves = _curves("mup")
    best = [_best(curves[d]) for d in (2, 4, 16, 32)]
    assert all(a >= b for a, b in itertools.pairwise(best)) and best[0] > best[-1], best
    paid = {d: _mean(curves[d])[-4.0] - min(_mean(curves[d]).values()) for d in (2, 4, 16)}
    assert paid[2] < 0.01 < paid[4] < paid[16] and paid[16] > 0.3, paid


def test_completep_sits_above_width_only_mup_at_depth_and_is_better_there():
    """At depths 16 and 32 CompleteP's best lr is above width-only muP's, it pays less at 2^-4, and its best loss is
    no worse."""
    mup, completep = _curves("mup"), _curves("completep")
    for depth in (16, 32):
        assert _best(completep[depth]) > _best(mup[depth]), depth
        assert min(_mean(completep[depth]).values()) <= min(_mean(mup[depth]).values()) + 0.005, depth
    assert _mean(completep[16])[-4.0] < _mean(mup[16])[-4.0] - 0.25


def test_depth_1_is_no_base_at_this_horizon():
    """The one-block model is capacity-limited at 1650 steps: its curve spans about 0.1 over a x128 lr range and is
    not unimodal, so its arg-min is noise (why section 4c counts shifts from depth 2)."""
    curve = _mean(_curves("mup")[1])
    values = [curve[lr] for lr in sorted(curve)]
    assert max(values) - min(values) < 0.15
    assert sum(1 for a, b, c in zip(values, values[1:], values[2:]) if b < min(a, c)) >= 2, values


def _two_seed_shift(parametrization: str) -> int:
    curves = _curves(parametrization)
    for depth in (2, 32):
        assert all(len(losses) >= 2 for losses in curves[depth].values()), f"depth {depth}: one seed only"
    return round(_best(curves[2]) - _best(curves[32]))


@pytest.mark.xfail(
    strict=True,
    reason="issue 15 stays open: seed 1 of recipes/sweeps/depth_transfer_probe.yaml has only its depth-32 cells so "
    "far (docs/experiments/README.md section 4c)",
)
def test_two_seeds_width_only_mup_shifts_at_least_two_steps_and_completep_at_most_one():
    assert _two_seed_shift("mup") >= 2
    assert _two_seed_shift("completep") <= 1
