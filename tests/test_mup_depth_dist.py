"""A depth muP plan under DDP and FSDP2: a real two-process CPU run (gloo) via torch.distributed.run."""

from __future__ import annotations

from pathlib import Path

import _launch
import pytest

SCRIPT = Path(__file__).parent / "dist" / "mup_depth_check.py"


@pytest.mark.slow
def test_depth_plan_survives_ddp_and_fully_shard_two_processes():
    result = _launch.torchrun_two_ranks(SCRIPT)
    assert "MUP_DEPTH_DIST_OK" in result.stdout, result.tail()
    assert result.stdout.count("alpha=1.0 ok") == 2, result.tail()  # both ranks checked both alphas
