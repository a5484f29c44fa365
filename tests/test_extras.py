"""The core install: ``pip install hf-optim`` without extras pulls torch + transformers only, and still imports
``hf_optim`` and builds every registered optimizer; the commands that need the ``train`` extra say so.

"Installed without extras" is reproduced without a network: a site-packages made of links to every distribution of
this environment except the extras' (accelerate, datasets, matplotlib), used by ``python -S`` (no site, so nothing of
the full environment is visible) with the checkout on ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
EXTRA_MODULES = ("accelerate", "datasets", "matplotlib")


def _declared() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_core_dependencies_are_torch_transformers_and_small_libraries():
    names = {d.split(">")[0].split("=")[0].split("[")[0].strip() for d in _declared()["dependencies"]}
    assert names == {"torch", "transformers", "numpy", "pyyaml"}
    train = " ".join(_declared()["optional-dependencies"]["train"])
    assert all(m in train for m in EXTRA_MODULES)


def _core_site(tmp_path: Path) -> Path:
    """A site-packages of links to this environment's, less the extras' packages and distributions."""
    site = Path(sysconfig.get_paths()["purelib"])
    core = tmp_path / "site"
    core.mkdir()
    for entry in site.iterdir():
        lowered = entry.name.lower()
        if any(lowered.startswith(m) for m in EXTRA_MODULES) or entry.suffix == ".pth":
            continue
        if lowered.startswith(("hf_optim", "hf-optim", "__editable__")):
            continue  # the checkout itself comes from PYTHONPATH
        (core / entry.name).symlink_to(entry)
    return core


def _run_core(tmp_path: Path, code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(_core_site(tmp_path))])}
    env.pop("PYTHONSTARTUP", None)
    return subprocess.run(
        [sys.executable, "-S", "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symbolic links")
def test_without_extras_every_optimizer_builds_and_train_names_its_extra(tmp_path):
    code = """
import importlib.util, sys
for m in ("accelerate", "datasets", "matplotlib"):
    assert importlib.util.find_spec(m) is None, m + " is visible"
import torch, hf_optim
from hf_optim.registry import list_optimizers
model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
built = []
for spec in list_optimizers():
    opt = hf_optim.create_optimizer(spec.name, model, lr=1e-3)
    model(torch.randn(4, 8)).square().mean().backward()
    opt.step()
    opt.zero_grad()
    built.append(spec.name)
print("built", len(built), ",".join(built))
from hf_optim import cli
print("train rc", cli.main(["train"]))
print("list rc", cli.main(["list"]))
assert not any(m in sys.modules for m in ("accelerate", "datasets", "matplotlib"))
"""
    done = _run_core(tmp_path, code)
    assert done.returncode == 0, done.stdout + done.stderr
    from hf_optim.registry import list_optimizers

    built_in = [s for s in list_optimizers() if s.target.startswith("hf_optim.")]  # a test may have added a toy
    assert f"built {len(built_in)} " in done.stdout
    assert "train rc 2" in done.stdout and "list rc 0" in done.stdout
    assert "hf-optim train needs accelerate, datasets, matplotlib" in done.stderr
    assert "pip install 'hf-optim[train]'" in done.stderr


def test_with_the_extras_installed_no_command_is_refused():
    from hf_optim import cli

    assert all(cli.missing_extra(command) is None for command in cli.COMMANDS)
