"""`hf-optim bench` on the tiny parameter set: the report is well-formed and ratios use the same run's reference.

No timing assertions: the machine may be shared. Only a handful of cases run, with one timed step each.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from hf_optim import bench
from hf_optim._bench_params import SIZES, make_params


def test_llama_58m_shapes_match_the_issue():
    shape = SIZES["58m"]
    # embed + untied head (2·32000·512) + 8 layers of q,k,v,o (4·512²) and gate/up/down (3·1376·512) + 17 norms.
    expected = 2 * 32000 * 512 + 8 * (4 * 512 * 512 + 3 * 1376 * 512 + 2 * 512) + 512
    assert shape.numel() == expected
    assert 57e6 < expected < 59e6
    params = make_params("tiny")
    assert sum(p.numel() for p in params) == SIZES["tiny"].numel()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in params)


def test_json_report_and_ratios(tmp_path):
    out = tmp_path / "bench.json"
    # (a regex may not contain ',', which separates patterns)
    only = r"^torch_adamw_foreach$,^adamw_v2\[coupled.wd=0.1.eps=torch\]/foreach$,^hf_adafactor$"
    rc = bench.main(["--size", "tiny", "--threads", "1", "--warmup", "0", "--repeats", "2", "--only", only,
                     "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["meta"]["size"] == "tiny" and report["meta"]["threads"] == 1
    assert report["meta"]["numel"] == SIZES["tiny"].numel()
    by_name = {r["name"]: r for r in report["results"]}
    assert set(by_name) == {bench.REFERENCE, "torch_adamw_foreach", "adamw_v2[coupled,wd=0.1,eps=torch]/foreach",
                            "hf_adafactor"}
    ref = by_name[bench.REFERENCE]
    # The reference runs first and last; its median pools both runs (2 + 2 timed steps).
    middle = sorted(ref["times_s"])[1:3]
    assert len(ref["times_s"]) == 4 and ref["median_s"] == pytest.approx(sum(middle) / 2)
    assert ref["ratio_to_reference"] == pytest.approx(1.0)
    numel = report["meta"]["numel"]
    for r in report["results"]:
        assert r["status"] == "ok", r
        if r["name"] != bench.REFERENCE:
            assert len(r["times_s"]) == 2 and r["median_s"] == pytest.approx(sum(r["times_s"]) / 2)
        assert r["ratio_to_reference"] == pytest.approx(r["median_s"] / ref["median_s"])
        assert r["gbytes_per_s"] == pytest.approx(r["bytes_per_param"] * numel / r["median_s"] / 1e9)
        assert math.isfinite(r["first_step_s"]) and r["first_step_s"] > 0
    # State bytes: AdamW keeps two fp32 moments per element (+ one 0-d step per tensor); the byte model is 28 B/param.
    n_tensors = len(SIZES["tiny"].shapes())
    for name in (bench.REFERENCE, "torch_adamw_foreach"):
        assert by_name[name]["state_bytes"] == 8 * numel + 4 * n_tensors
    assert by_name[bench.REFERENCE]["bytes_per_param"] == pytest.approx(28.0, abs=0.01)
    # transformers' Adafactor (no momentum) factors every matrix: far less state, gradient read twice.
    hf = by_name["hf_adafactor"]
    assert hf["state_bytes"] < 0.2 * ref["state_bytes"] and hf["state_ratio_to_reference"] < 0.2
    assert 16.0 <= hf["bytes_per_param"] < 20.0


def test_missing_and_failing_optimizers_are_rows_not_crashes():
    class Boom(torch.optim.SGD):
        def step(self, closure=None):
            raise RuntimeError("kaboom")

    cases = [
        bench.BenchCase("missing_one", lambda p: __import__("hf_optim.no_such_module")),
        bench.BenchCase("exploding", lambda p: Boom(p, lr=0.1)),
        bench.BenchCase("sgd", lambda p: torch.optim.SGD(p, lr=0.1)),
    ]
    lines: list[str] = []
    report = bench.run("tiny", threads=1, warmup=0, repeats=1, cases=cases, progress=lines.append)
    by_name = {r["name"]: r for r in report["results"]}
    assert by_name["missing_one"]["status"] == "missing" and "no_such_module" in by_name["missing_one"]["error"]
    assert by_name["exploding"]["status"] == "error" and "kaboom" in by_name["exploding"]["error"]
    assert by_name["exploding"]["ratio_to_reference"] is None
    assert by_name["sgd"]["status"] == "ok" and by_name["sgd"]["state_bytes"] == 0
    table = "\n".join(lines)
    assert "MISSING" in table and "ERROR" in table and bench.REFERENCE in table


def test_bad_arguments_are_rejected():
    with pytest.raises(SystemExit):
        bench.main(["--size", "huge"])
    with pytest.raises(SystemExit):
        bench.main(["--size", "tiny", "--repeats", "0"])
