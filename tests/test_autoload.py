"""The .pth hook: unmodified scripts in fresh interpreters get the --optim names; the switch-off variable works."""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

import hf_optim

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "train_tiny_clm.py"
PTH = Path(hf_optim.__file__).with_name("hf_optim_autoload.pth")
NAMES = ["adafactor_v2", "adamw_v2", "adam_v2", "radam_v2", "sgdw_v2", "adagrad_v2", "rmsprop_v2", "adam_atan2"]

# Installed wheels (CI: `pip install .`) put the .pth in site-packages; an editable install made before setup.py
# existed does not. Then the fresh interpreter processes a copy of the same file with site.addsitedir, exactly as
# start-up does for site-packages, before running the script.
_SITE_DIRS = [*site.getsitepackages(), site.getusersitepackages()]
PTH_INSTALLED = any(Path(d, PTH.name).exists() for d in _SITE_DIRS)


def _python(tmp_path: Path) -> list[str]:
    if PTH_INSTALLED:
        return [sys.executable]
    sitedir = tmp_path / "sitedir"
    sitedir.mkdir(exist_ok=True)
    (sitedir / PTH.name).write_text(PTH.read_text())
    return [
        sys.executable,
        "-c",
        f"import site; site.addsitedir({str(sitedir)!r}); "
        "import sys, runpy; sys.argv[:] = sys.argv[2:]; runpy.run_path(sys.argv[0], run_name='__main__')",
        "--",
    ]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "HF_OPTIM_DISABLE_AUTOLOAD"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(ROOT), **extra)
    return env


def _script_args(out: Path, optim: str, optim_args: str | None = None) -> list[str]:
    args = [
        str(SCRIPT),
        "--output_dir",
        str(out),
        "--optim",
        optim,
        "--max_steps",
        "3",
        "--logging_steps",
        "1",
        "--per_device_train_batch_size",
        "4",
        "--num_examples",
        "12",
        "--learning_rate",
        "1e-2",
        "--report_to",
        "none",
        "--save_strategy",
        "no",
        "--use_cpu",
        "--disable_tqdm",
        "true",
    ]
    return args + (["--optim_args", optim_args] if optim_args else [])


def test_pth_line_imports_nothing_and_respects_the_switch(monkeypatch):
    line = next(l for l in PTH.read_text().splitlines() if l.startswith("import "))
    for value, expected in (("", 1), ("0", 1), ("1", 0), ("true", 0)):
        monkeypatch.setenv("HF_OPTIM_DISABLE_AUTOLOAD", value)
        meta_path = [f for f in sys.meta_path if not getattr(f, "hf_optim_hook", False)]
        monkeypatch.setattr(sys, "meta_path", meta_path)
        before = set(sys.modules)
        exec(line, {})
        exec(line, {})  # a site dir seen twice (lib and lib64) must not add a second hook
        assert set(sys.modules) == before
        hooks = [f for f in sys.meta_path if getattr(f, "hf_optim_hook", False)]
        assert len(hooks) == expected
        if hooks:
            assert hooks[0].find_spec("json") is None and hooks[0].find_spec("transformers") is None


def test_fresh_interpreter_startup_imports_nothing_heavy(tmp_path):
    code = (
        "import sys; print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('hf_optim', 'transformers', 'torch'))); print([type(f).__name__ for f in sys.meta_path])"
    )
    if PTH_INSTALLED:
        cmd = [sys.executable, "-c", code]
    else:
        probe = tmp_path / "probe.py"
        probe.write_text(code)
        cmd = [*_python(tmp_path), str(probe)]
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == "[]" and "HfOptimAutoloadTrampoline" in out[1]


@pytest.mark.parametrize("target", ["hf_optim.integrations.transformers.autoload", "hf_optim._autoload"])
def test_the_pth_line_of_this_and_of_an_earlier_release_registers_the_names(tmp_path, target):
    """The .pth installed by an earlier release imports ``hf_optim._autoload`` (the module's name before the
    sub-packages); it stays a working name, so an upgrade that leaves the old file behind still registers."""
    line = PTH.read_text().splitlines()[-1]
    now = '__import__("hf_optim.integrations.transformers.autoload", fromlist=("autoload",))'
    assert now in line
    if target == "hf_optim._autoload":
        line = line.replace(now, '__import__("hf_optim._autoload")._autoload')
    sitedir = tmp_path / "sitedir"
    sitedir.mkdir()
    (sitedir / PTH.name).write_text(line + "\n")
    code = (
        # -S: no site-packages .pth runs (an installed hook would otherwise answer first); paths added by hand
        f"import sys; sys.path[:0] = {[str(ROOT), *site.getsitepackages()]!r}; import site; "
        f"site.addsitedir({str(sitedir)!r}); "
        "from transformers.training_args import OptimizerNames; print(OptimizerNames('adafactor_v2').value)"
    )
    done = subprocess.run([sys.executable, "-S", "-c", code], env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "adafactor_v2", done.stderr[-3000:]


@pytest.mark.slow
def test_unmodified_script_runs_adafactor_v2(tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(
        [*_python(tmp_path), *_script_args(out, "adafactor_v2", "beta1=0.8, momentum_dtype=float32")],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["optimizer"] == "hf_optim.optim.adafactor.optimizer.Adafactor"
    logs = [h for h in summary["log_history"] if "loss" in h]
    assert len(logs) == 3 and all("lr/group_0" in h and "wd/group_1" in h for h in logs)


@pytest.mark.slow
def test_unmodified_script_runs_every_other_name_in_one_fresh_interpreter(tmp_path):
    # One interpreter (start-up cost once); the script is executed anew per name and builds a new parser each time.
    runs = [_script_args(tmp_path / name, name, "momentum=0.9" if name == "sgdw_v2" else None) for name in NAMES[1:]]
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import runpy, sys\n"
        f"for argv in {runs!r}:\n"
        "    sys.argv = argv\n"
        "    runpy.run_path(argv[0], run_name='__main__')\n"
    )
    result = subprocess.run([*_python(tmp_path), str(driver)], env=_env(), capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    from hf_optim import registry

    for name in NAMES[1:]:
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        cls = registry.get_spec(name).resolve()
        assert summary["optimizer"] == f"{cls.__module__}.{cls.__name__}"
        assert all("lr/group_0" in h for h in summary["log_history"] if "loss" in h)


def test_switched_off_the_script_gets_transformers_invalid_choice(tmp_path):
    result = subprocess.run(
        [*_python(tmp_path), *_script_args(tmp_path / "off", "adafactor_v2")],
        env=_env(HF_OPTIM_DISABLE_AUTOLOAD="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "argument --optim: invalid choice: 'adafactor_v2'" in result.stderr
    assert "'adamw_torch'" in result.stderr  # transformers' own list, without ours


def test_bad_optim_args_in_a_script_give_our_error(tmp_path):
    result = subprocess.run(
        [*_python(tmp_path), *_script_args(tmp_path / "bad", "adamw_v2", "eps_mod=tf")],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "Unknown optim_args key 'eps_mod'" in result.stderr and "Did you mean 'eps_mode'?" in result.stderr
    # malformed syntax is caught before transformers' own split (which would fail with a bare unpacking error)
    result = subprocess.run(
        [*_python(tmp_path), *_script_args(tmp_path / "bad2", "adamw_v2", "eps_mode=tf,")],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0 and "has an empty item" in result.stderr, result.stderr[-2000:]


@pytest.mark.slow
def test_wheel_puts_the_pth_at_the_root_of_site_packages(tmp_path):
    # What CI's `pip install ".[test]"` (not editable) installs: files at the wheel's root land in site-packages.
    import shutil
    import zipfile

    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 68:
        pytest.skip("building offline (--no-build-isolation) needs setuptools >= 68, as pyproject.toml requires")
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("hf_optim", "mup_integration", "recipes"):  # recipes: the YAML data of hf_optim.recipes
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-w",
            str(tmp_path / "dist"),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("hf_optim-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        assert zf.read(PTH.name).decode() == PTH.read_text()
        record = next(n for n in names if n.endswith(".dist-info/RECORD"))
        assert any(line.startswith(f"{PTH.name},sha256=") for line in zf.read(record).decode().splitlines())
    assert [n for n in names if "/" not in n] == [PTH.name]  # nothing else at the top level of site-packages
    # exactly two top-level import packages; the recipe YAML is package data of hf_optim.recipes
    top = {n.split("/")[0] for n in names if "/" in n and ".dist-info/" not in n}
    assert top == {"hf_optim", "mup_integration"}, top
    assert {
        "hf_optim/recipes/llm/llama2.yaml",
        "hf_optim/recipes/sweeps/quick.yaml",
        "hf_optim/recipes/accelerate/ddp.yaml",
    } <= set(names)
    assert "hf_optim/optim/adafactor/native.c" in names  # the Adafactor kernel's source, compiled at first use


def test_startup_benchmark_reports_and_the_hook_imports_nothing():
    # The <= 5 ms target is checked by `hf-optim bench-startup` (docs/trainer.md), not by timing here; this checks
    # the benchmark works and the part of its report that is not a timing.
    from hf_optim.bench import startup as bench_startup

    report = bench_startup.measure(runs=2)
    assert report["modules_imported_by_hook"] == []
    assert set(report["workloads"]) == set(bench_startup.WORKLOADS)
    for row in report["workloads"].values():
        assert row["baseline_ms"] > 0 and row["with_hook_ms"] > 0
    assert "target" in bench_startup.format_report(report)
    with pytest.raises(ValueError, match="runs must be >= 1"):
        bench_startup.measure(runs=0)
