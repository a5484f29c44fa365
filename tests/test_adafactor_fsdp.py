"""Adafactor under FSDP2 and DDP: two CPU processes (gloo) equal a single process within 1e-6 after 20 steps, and the
FSDP2 step communicates only O(rows + cols) values per matrix (see tests/dist/adafactor_fsdp.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import _launch
import pytest
import torch.distributed as dist

SCRIPT = Path(__file__).parent / "dist" / "adafactor_fsdp.py"


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed + gloo")
def test_fsdp2_and_ddp_equal_single_process():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    # --standalone: torchrun's rendezvous binds a free port itself (localhost:0), so parallel launches cannot collide.
    result = _launch.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT)],
        timeout=300,
        env=env,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith(("OK", "FAIL"))]
    # One line per configuration (factored with/without (bf16) momentum, parameter scaling, last-two dims), each
    # also checking that the FSDP2 step communicates only O(rows + cols) values per matrix; one line for the probe.
    assert len(lines) == 5 and all(line.startswith("OK") for line in lines), lines
    assert sum("step_comm_max=" in line for line in lines) == 4 and "full_tensor" in lines[-1], lines
