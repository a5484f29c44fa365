"""Every bad input to an ``hf-optim`` command ends in exit 2 and one clear line, before any work (issue 29).

Each case runs the real console entry point in a subprocess, in a scratch folder, and asserts: exit code 2, no
"Traceback" on stderr, the last stderr line naming the argument, file or value at fault, and the folder (outputs,
checkpoints) exactly as it was before the command.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hf_optim

BAD_YAML = "name: broken\nkind: demo\noptimizer: {name: adamw_v2\n  lr: [1\n"
BAD_SWEEP = "name: s\nmodel: {layers: 1}\ngrids: []\nbogus: 1\n"

# (command line after `hf-optim`, text the error line must contain). `OUT` is an output folder that must not appear.
CASES: list[tuple[str, str]] = [
    # the five reported in the issue
    ("train llm/llama2 optimizer.lr=-1e-3 run.max_steps=5 --output-dir OUT", "lr must be >= 0"),
    ("train demo optimizer.args.beta1=2 run.max_steps=5 --output-dir OUT", "beta1 must be in [0, 1)"),
    ("train bad.yaml --output-dir OUT", "bad.yaml: YAML error at line 4, column 5"),
    ("train llm/palm run.max_steps=40 --resume ckpt/checkpoint-30 --output-dir OUT", "--resume ckpt/checkpoint-30"),
    (
        "train llm/llama2 optimizer.eps_mode=torch optimizer.args.eps_mode=tf --output-dir OUT",
        "optimizer.eps_mode='torch' and optimizer.args.eps_mode='tf' disagree",
    ),
    # train: recipe, overrides and options
    ("train nosuchrecipe --output-dir OUT", "'nosuchrecipe' is neither a file nor a bundled recipe"),
    ("train demo run.max_steps --output-dir OUT", "'run.max_steps' must look like section.key=value"),
    ("train demo run.nosuch=1 --output-dir OUT", "unknown key 'run.nosuch'"),
    ("train demo run.max_steps=0 --output-dir OUT", "run.max_steps must be an integer >= 1, got 0"),
    ("train demo --threads 0 --output-dir OUT", "--threads must be an integer >= 1, got 0"),
    ("train demo optimizer.name=nosuch --output-dir OUT", "Unknown optimizer 'nosuch'"),
    ("train demo optimizer.weight_decay_mode=foo --output-dir OUT", "optimizer.weight_decay_mode must be one of"),
    ("train demo model.arch=bert --output-dir OUT", "model.arch must be one of ['llama', 'gpt2'], got 'bert'"),
    ("train demo data.corpus=/nonexistent/c.txt --output-dir OUT", "data.corpus must be one of"),
    ("train demo --resume /nonexistent/ckpt --output-dir OUT", "--resume '/nonexistent/ckpt'"),
    ("train demo --resume --output-dir OUT", "--resume: no checkpoint-N directory"),
    ("train demo optimizer.args.nosuch=1 --output-dir OUT", "Unknown knob 'nosuch'"),
    ("train llm/llama2 optimizer.betas=[0.9] --output-dir OUT", "optimizer.betas must be a pair of numbers"),
    ("train demo optimizer.lr=abc --output-dir OUT", "optimizer.lr must be a float, got 'abc'"),
    ("train llm/llama2 run.size=99B --output-dir OUT", "run.size='99B' is not a size of this recipe"),
    ("train demo schedule.name=nosuch --output-dir OUT", "schedule must be one of"),
    ("train demo schedule.warmup_fraction=1.5 --output-dir OUT", "schedule.warmup_fraction must be in [0, 1)"),
    ("train llm/llama2 optimizer.eps=-1 --output-dir OUT", "eps must be >= 0, got -1"),
    ("train demo model.hidden_size=-64 --output-dir OUT", "model.hidden_size must be an integer >= 1"),
    ("train llm/llama2 optimizer.args.eps_mode=keras --output-dir OUT", "eps_mode must be one of"),
    ("train plain.txt --output-dir OUT", "plain.txt: a recipe must be a YAML mapping"),
    # sweep
    ("sweep nosuchsweep --out OUT", "'nosuchsweep' is neither a file nor a bundled sweep"),
    ("sweep quick --jobs 0 --out OUT", "jobs must be an integer >= 1, got 0"),
    ("sweep sweep.yaml --out OUT", "unknown top-level keys ['bogus']"),
    # export
    ("export /nonexistent OUT", "SRC '/nonexistent' is not a directory"),
    ("export plain.txt OUT", "SRC 'plain.txt' is not a directory"),
    # coord-check
    ("coord-check --widths abc --out-dir OUT", "--widths must be comma-separated integers"),
    ("coord-check --steps 0 --out-dir OUT", "--steps must be an integer >= 1, got 0"),
    ("coord-check --lr -1 --out-dir OUT", "--lr must be a finite number > 0"),
    ("coord-check --widths 0,64 --out-dir OUT", "--widths must be integers >= 1"),
    ("coord-check --depths 0 --out-dir OUT", "--depths must be integers >= 1"),
    # bench
    ("bench --repeats 0 --json OUT", "--repeats (0)"),
    ("bench --only [ --json OUT", "--only: '[' is not a regular expression"),
    ("bench --device bogus --json OUT", "--device 'bogus' is not a device"),
    ("bench --size huge --json OUT", "argument --size: invalid choice: 'huge'"),
    # groups
    ("groups demo --lr 3", "--lr apply to a model config"),
    ("groups missing.json", "model config 'missing.json' does not exist"),
    ("groups demo --groups rules.yaml", "groups rule 0 (match 'no_such_layer') matches no parameter"),
    ("groups demo --groups missing.yaml", "--groups='missing.yaml': no such file"),
    ("groups demo --layer-decay 1.5", "layer_decay must be a number in (0, 1]"),
    # the command itself
    ("nosuchcommand", "unknown command 'nosuchcommand'"),
]


def _write_inputs(folder: Path) -> None:
    (folder / "bad.yaml").write_text(BAD_YAML)
    (folder / "sweep.yaml").write_text(BAD_SWEEP)
    (folder / "plain.txt").write_text("just text\n")
    (folder / "rules.yaml").write_text("- {match: no_such_layer, lr_mult: 2}\n")
    # The optimizer state of an AdamW run (what llm/llama2 saves), for a recipe of another family to resume.
    checkpoint = folder / "ckpt" / "checkpoint-30"
    checkpoint.mkdir(parents=True)
    weight = torch.nn.Parameter(torch.ones(3, 2))
    opt = hf_optim.AdamW([weight], lr=1e-3)
    weight.grad = torch.ones_like(weight)
    opt.step()
    torch.save(opt.state_dict(), checkpoint / "optimizer.pt")


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize(("command", "expected"), CASES, ids=[c for c, _ in CASES])
def test_bad_input_is_one_line_exit_2_and_touches_nothing(tmp_path: Path, command: str, expected: str) -> None:
    _write_inputs(tmp_path)
    before = _snapshot(tmp_path)
    argv = [arg.replace("OUT", str(tmp_path / "out")) for arg in command.split()]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("HF_OPTIM_DEBUG", None)
    result = subprocess.run(
        [sys.executable, "-m", "hf_optim", *argv], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert expected in last, last
    assert _snapshot(tmp_path) == before, "the command created or changed files"


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    """``--debug`` turns the one line back into the traceback (and so a non-2 exit)."""
    argv = ["train", "llm/llama2", "optimizer.lr=-1e-3", "--output-dir", str(tmp_path / "out"), "--debug"]
    result = subprocess.run([sys.executable, "-m", "hf_optim", *argv], capture_output=True, text=True, timeout=240)
    assert "Traceback" in result.stderr and "lr must be >= 0" in result.stderr
    assert not (tmp_path / "out").exists()
