"""`.ci/gpu --dry-run`: the GPU check script's steps run on CPU at toy size (the CUDA tests are collected, the bench
covers Muon), so the script cannot rot while no GPU is lent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_script_dry_run(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(
        ["bash", str(ROOT / ".ci" / "gpu"), "--dry-run"], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    collected = (tmp_path / "cuda-tests.txt").read_text()
    assert "test_cuda.py::test_cuda_steps_like_cpu[muon-coupled]" in collected
    assert "test_cuda.py::test_muon_on_cuda_matches_torch_muon" in collected
    rows = json.loads((tmp_path / "bench-fp32.json").read_text())
    text = json.dumps(rows)
    assert "muon_v2/auto" in text and "torch_adamw_fused" in text
