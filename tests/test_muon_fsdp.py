"""Muon under FSDP2 (two CPU ranks, gloo, via torchrun) equals one process: sharded matrices are orthogonalised whole."""

from __future__ import annotations

from pathlib import Path

import _launch
import pytest

SCRIPT = Path(__file__).parent / "dist" / "muon_fsdp_check.py"


@pytest.mark.slow
def test_muon_fsdp2_equals_one_process():
    result = _launch.torchrun_two_ranks(SCRIPT)
    assert "MUON_FSDP_OK" in result.stdout, result.tail()
