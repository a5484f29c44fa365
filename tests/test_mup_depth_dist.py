"""A depth muP plan under DDP and FSDP2: a real two-process CPU run (gloo) via torch.distributed.run."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import _launch
import pytest

SCRIPT = Path(__file__).parent / "dist" / "mup_depth_check.py"


@pytest.mark.slow
def test_depth_plan_survives_ddp_and_fully_shard_two_processes():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT)]
    # --standalone: torchrun's rendezvous binds a free port itself (localhost:0), so parallel launches cannot collide;
    # the harness kills every rank on timeout and fails on a rank left behind.
    result = _launch.run(cmd, env=env, timeout=300, cwd=Path(__file__).parent.parent)
    assert "MUP_DEPTH_DIST_OK" in result.stdout, result.tail()
    assert result.stdout.count("alpha=1.0 ok") == 2, result.tail()  # both ranks checked both alphas
