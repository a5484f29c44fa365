"""`hf-optim bench` on the tiny parameter set: the report is well-formed, ratios come from paired steps, unreliable
rows are flagged.

No assertions on real speed: the machine may be shared. Flags are checked with a fake clock (exact) and with one
case that sleeps 50 ms in one of its steps (a spread no load can hide); only a handful of cases run.
"""

from __future__ import annotations

import json
import math
import statistics
import time
import types

import pytest
import torch

from hf_optim import bench
from hf_optim.bench.cases import BenchCase
from hf_optim.bench.params import SIZES, make_params


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
    rc = bench.main(
        ["--size", "tiny", "--threads", "1", "--warmup", "0", "--repeats", "2", "--only", only, "--json", str(out)]
    )
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["meta"]["size"] == "tiny" and report["meta"]["threads"] == 1
    assert report["meta"]["numel"] == SIZES["tiny"].numel()
    assert report["meta"]["max_spread"] == 1.5 and report["meta"]["max_drift"] == 1.25
    assert len(report["meta"]["load_average"]) == 2 and report["meta"]["cpu_count"] >= 1
    by_name = {r["name"]: r for r in report["results"]}
    assert set(by_name) == {
        bench.REFERENCE,
        "torch_adamw_foreach",
        "adamw_v2[coupled,wd=0.1,eps=torch]/foreach",
        "hf_adafactor",
    }
    ref = report["results"][0]
    assert ref["name"] == bench.REFERENCE
    others = report["results"][1:]
    # Every timed step of a case is paired with a reference step; the reference's row pools all of them.
    assert sorted(ref["times_s"]) == sorted(t for r in others for t in r["reference_times_s"])
    assert len(ref["times_s"]) == 6 and ref["median_s"] == pytest.approx(statistics.median(ref["times_s"]))
    assert ref["ratio_to_reference"] == 1.0
    numel = report["meta"]["numel"]
    for r in report["results"]:
        assert r["status"] == "ok", r
        assert set(r["flags"]) <= {"spread", "reference-spread", "reference-drift"}  # no speed asserted
        assert r["gbytes_per_s"] == pytest.approx(r["bytes_per_param"] * numel / r["median_s"] / 1e9)
        assert math.isfinite(r["first_step_s"]) and r["first_step_s"] > 0
        assert r["spread"] == pytest.approx(max(r["times_s"]) / min(r["times_s"]))
    for r in others:
        assert len(r["times_s"]) == 2 and len(r["reference_times_s"]) == 2
        assert r["median_s"] == pytest.approx(sum(r["times_s"]) / 2)
        pair_ratios = [t / u for t, u in zip(r["times_s"], r["reference_times_s"])]
        assert r["ratio_to_reference"] == pytest.approx(sum(pair_ratios) / 2)
        assert r["reference_drift"] == pytest.approx(statistics.median(r["reference_times_s"]) / ref["median_s"])
    # State bytes: AdamW keeps two fp32 moments per element (+ one 0-d step per tensor); the byte model is 28 B/param.
    n_tensors = len(SIZES["tiny"].shapes())
    for name in (bench.REFERENCE, "torch_adamw_foreach"):
        assert by_name[name]["state_bytes"] == 8 * numel + 4 * n_tensors
    assert by_name[bench.REFERENCE]["bytes_per_param"] == pytest.approx(28.0, abs=0.01)
    # transformers' Adafactor (no momentum) factors every matrix: far less state, gradient read twice.
    hf = by_name["hf_adafactor"]
    assert hf["state_bytes"] < 0.2 * ref["state_bytes"] and hf["state_ratio_to_reference"] < 0.2
    assert 16.0 <= hf["bytes_per_param"] < 20.0


# --- reliability flags, with a fake clock: exact, whatever the machine is doing ---------------------------------------


class FakeClock:
    """Seconds that pass only when a :class:`ScriptedStep` optimizer steps; ``load`` multiplies every step."""

    def __init__(self) -> None:
        self.now = 0.0
        self.load = 1.0

    def __call__(self) -> float:
        return self.now


class ScriptedStep(torch.optim.Optimizer):
    """Takes ``durations[k]`` seconds (times the clock's load) on its k-th step, the last one repeated after that."""

    def __init__(self, params, clock: FakeClock, durations: list[float], load: float | None = None) -> None:
        super().__init__(params, {})
        self.clock, self.durations, self.calls = clock, durations, 0
        if load is not None:  # the machine gets busy when this case starts
            clock.load = load

    def step(self, closure=None):
        self.clock.now += self.durations[min(self.calls, len(self.durations) - 1)] * self.clock.load
        self.calls += 1


def _scripted(name: str, clock: FakeClock, durations: list[float], load: float | None = None) -> BenchCase:
    return BenchCase(name, lambda p: ScriptedStep(p, clock, durations, load))


def test_erratic_rows_and_reference_drift_are_flagged_and_ratios_stay_paired():
    clock = FakeClock()
    # warm-up 1, 4 repeats: each case steps 1 (first) + 1 (warm-up) + 4 timed times.
    cases = [
        _scripted(bench.REFERENCE, clock, [1.0]),
        _scripted("steady", clock, [2.0]),
        _scripted("erratic", clock, [2.0, 2.0, 2.0, 2.0, 8.0, 2.0]),  # one timed step 4x slower than the others
        _scripted("under_load", clock, [2.0], load=3.0),  # from here on, everything takes 3x as long
    ]
    lines: list[str] = []
    report = bench.run("tiny", warmup=1, repeats=4, cases=cases, progress=lines.append, clock=clock)
    rows = {r["name"]: r for r in report["results"]}
    ref, steady, erratic, loaded = (rows[n] for n in (bench.REFERENCE, "steady", "erratic", "under_load"))
    assert steady["times_s"] == [2.0] * 4 and steady["reference_times_s"] == [1.0] * 4
    assert steady["ratio_to_reference"] == 2.0 and steady["spread"] == 1.0 and steady["flags"] == []
    assert erratic["spread"] == 4.0 and erratic["flags"] == ["spread"]
    assert erratic["ratio_to_reference"] == 2.0  # the median of the pairs ignores the one slow step
    # The load tripled both sides of every pair: the paired ratio is still 2, unpaired medians would say 6.
    assert loaded["times_s"] == [6.0] * 4 and loaded["reference_times_s"] == [3.0] * 4
    assert loaded["ratio_to_reference"] == 2.0 and loaded["median_s"] / ref["median_s"] == 6.0
    assert loaded["reference_drift"] == 3.0 and loaded["flags"] == ["reference-drift"]
    # The reference pools 12 paired steps (8 at 1 s, 4 at 3 s); its medians ranged over 3x during the run.
    assert sorted(ref["times_s"]) == [1.0] * 8 + [3.0] * 4 and ref["median_s"] == 1.0
    assert report["meta"]["reference_drift"] == 3.0 and ref["flags"] == ["spread", "reference-drift"]
    assert report["meta"]["flagged"] == [bench.REFERENCE, "erratic", "under_load"]
    table = "\n".join(lines)
    row_of = {name: next(line for line in lines if line.startswith(name + " ")) for name in rows}
    assert row_of["erratic"].endswith("!S") and row_of["under_load"].endswith("!D")
    assert row_of[bench.REFERENCE].endswith("!SD") and "!" not in row_of["steady"]
    assert "# ! 3 of 4 rows are unreliable" in table and "S = its repeats spread by more than 1.5x" in table
    assert "D = the reference's median during the row was more than 1.25x off" in table


def test_no_footnote_when_nothing_is_flagged_and_limits_are_options():
    clock = FakeClock()
    cases = [_scripted(bench.REFERENCE, clock, [1.0]), _scripted("a", clock, [2.0, 2.0, 2.0, 3.0])]
    lines: list[str] = []
    # spread 1.5 is not "more than" 1.5; a tighter limit flags it
    report = bench.run("tiny", warmup=0, repeats=3, cases=cases, progress=lines.append, clock=clock)
    assert report["results"][1]["spread"] == 1.5 and report["results"][1]["flags"] == []
    assert not any("rows are unreliable" in line for line in lines)
    clock = FakeClock()
    cases = [_scripted(bench.REFERENCE, clock, [1.0]), _scripted("a", clock, [2.0, 2.0, 2.0, 3.0])]
    report = bench.run("tiny", warmup=0, repeats=3, cases=cases, progress=lines.append, clock=clock, max_spread=1.2)
    assert report["results"][1]["flags"] == ["spread"] and report["meta"]["max_spread"] == 1.2


def test_reference_spread_flag_load_note_and_pair_helpers():
    from hf_optim.bench.report import load_note, paired_ratio, row_flags, spread

    assert spread([0.2]) is None and spread([1.0, 2.5, 2.0]) == 2.5 and spread([0.0, 1.0]) == math.inf
    assert paired_ratio([2.0, 9.0, 3.0], [1.0, 3.0, 1.0]) == 3.0  # ratios 2, 3, 3
    assert paired_ratio([1.0], []) is None
    (line,) = load_note(3.0, 1.0, cpus=2)  # more runnable work than CPUs at the start: said under the table
    assert line.startswith("# ! load average 3.0, 1.0 (start, end) on 2 CPUs") and "not comparable" in line
    assert load_note(1.0, 2.0, cpus=2) == [] and load_note(None, None, cpus=1) == []
    row = types.SimpleNamespace(spread=1.1, reference_spread=1.6, reference_drift=0.7)
    assert row_flags(row, max_spread=1.5, max_drift=1.25) == ["reference-spread", "reference-drift"]
    assert row_flags(row, max_spread=2.0, max_drift=1.5) == []


def test_a_case_that_sleeps_at_random_is_flagged_in_real_time():
    # A real clock: one of the four timed steps sleeps 50 ms, the others are microsecond SGD steps on the tiny set.
    class Hiccup(torch.optim.SGD):
        calls = 0

        def step(self, closure=None):
            Hiccup.calls += 1
            if Hiccup.calls == 4:  # first step, warm-up, then the 2nd timed step
                time.sleep(0.05)
            return super().step(closure)

    lines: list[str] = []
    report = bench.run(
        "tiny",
        threads=1,
        warmup=1,
        repeats=4,
        progress=lines.append,
        cases=[BenchCase("hiccup", lambda p: Hiccup(p, lr=0.0))],
    )
    hiccup = report["results"][1]
    assert hiccup["name"] == "hiccup" and "spread" in hiccup["flags"] and max(hiccup["times_s"]) >= 0.05
    assert next(line for line in lines if line.startswith("hiccup ")).split()[-1].startswith("!")
    assert any("rows are unreliable" in line for line in lines)


def test_header_counts_small_sets_and_help_is_consistent(capsys):
    lines: list[str] = []
    bench.run("tiny", threads=1, warmup=0, repeats=1, cases=[], progress=lines.append)
    numel = SIZES["tiny"].numel()
    assert numel < 10**6 and lines[0].startswith(f"# tiny: {numel:,} params on cpu") and "0.0M" not in lines[0]
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "cuda when torch sees a GPU, else cpu" in text and "cpu (default)" not in text
    assert "--max-spread" in text and "--max-drift" in text


def test_missing_and_failing_optimizers_are_rows_not_crashes():
    class Boom(torch.optim.SGD):
        def step(self, closure=None):
            raise RuntimeError("kaboom")

    cases = [
        BenchCase("missing_one", lambda p: __import__("hf_optim.no_such_module")),
        BenchCase("exploding", lambda p: Boom(p, lr=0.1)),
        BenchCase("sgd", lambda p: torch.optim.SGD(p, lr=0.1)),
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
    for option in ("--max-spread", "--max-drift"):
        with pytest.raises(SystemExit):
            bench.main(["--size", "tiny", option, "0.9"])
    with pytest.raises(ValueError, match=r"max_drift must be a number >= 1 .*got nan"):
        bench.run("tiny", max_drift=float("nan"), cases=[])


def test_memory_mode_reports_exact_state_bytes_and_a_peak(tmp_path):
    """--memory: the int8 AdamW row's state bytes are the layout's (codes + an fp32 scale per block of 256 in each
    row, for tensors of >= 4096 elements; fp32 moments below; a 4-byte step per tensor); the peak is a measured,
    non-negative number."""
    out = tmp_path / "memory.json"
    assert (
        bench.main(["--memory", "--size", "tiny", "--only", r"^adamw_v2\[state=int8\]/auto$", "--json", str(out)]) == 0
    )
    rows = {r["name"]: r for r in json.loads(out.read_text())["memory"]}
    assert set(rows) == {bench.REFERENCE, "adamw_v2[state=int8]/auto"}
    expected = 0
    for shape in SIZES["tiny"].shapes():
        n = math.prod(shape)
        n_rows, n_cols = (1, n) if len(shape) < 2 else (shape[0], n // shape[0])
        expected += 4 + (2 * (n + 4 * n_rows * math.ceil(n_cols / 256)) if n >= 4096 else 8 * n)
    assert rows["adamw_v2[state=int8]/auto"]["state_bytes"] == expected
    assert rows[bench.REFERENCE]["state_bytes"] == sum(4 + 8 * math.prod(s) for s in SIZES["tiny"].shapes())
    assert all(r["peak_step_bytes"] >= 0 for r in rows.values())
