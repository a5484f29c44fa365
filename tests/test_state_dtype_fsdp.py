"""Quantised and bf16 optimizer state under FSDP2 (two CPU ranks, gloo, via torchrun): stored state shards with its
parameter, training equals one process, a sharded checkpoint resumes bitwise and a gathered 2-rank checkpoint
continues in one plain process as the run that never stopped (see tests/dist/state_dtype_fsdp_check.py)."""

from __future__ import annotations

from pathlib import Path

import _launch
import pytest

SCRIPT = Path(__file__).parent / "dist" / "state_dtype_fsdp_check.py"


@pytest.mark.slow
def test_stored_state_under_fsdp2_equals_one_process_and_reshards_to_one_rank():
    result = _launch.torchrun_two_ranks(SCRIPT)
    assert "STATE_DTYPE_FSDP_OK" in result.stdout, result.tail()
    lines = [line for line in result.stdout.splitlines() if "sharded resume bitwise" in line]
    assert len(lines) == 5, result.tail()
