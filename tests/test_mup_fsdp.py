"""The muP plan under DDP and FSDP2: a real two-process CPU run (gloo) via torchrun."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import _launch
import pytest

SCRIPT = Path(__file__).parent / "dist" / "mup_fsdp_check.py"


@pytest.mark.slow
def test_plan_survives_ddp_and_fully_shard_two_processes():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT)]
    # --standalone: torchrun's rendezvous binds a free port itself (localhost:0), so parallel launches cannot collide.
    result = _launch.run(cmd, env=env, timeout=300, cwd=Path(__file__).parent.parent)
    assert "MUP_DIST_OK" in result.stdout, result.tail()
