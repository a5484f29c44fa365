"""The muP plan under DDP and FSDP2: a real two-process CPU run (gloo) via torchrun."""

from __future__ import annotations

from pathlib import Path

import _launch
import pytest

SCRIPT = Path(__file__).parent / "dist" / "mup_fsdp_check.py"


@pytest.mark.slow
def test_plan_survives_ddp_and_fully_shard_two_processes():
    result = _launch.torchrun_two_ranks(SCRIPT)
    assert "MUP_DIST_OK" in result.stdout, result.tail()
