"""hf_optim.runner._shutdown: no tqdm monitor (a daemon thread) is left for the interpreter's finalization."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading

import pytest
from tqdm import auto
from tqdm._monitor import TMonitor

from hf_optim.runner import _shutdown


def _monitors() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if isinstance(t, TMonitor) and t.is_alive()]


def test_a_disabled_bar_leaves_a_monitor_running_and_stopping_joins_it():
    # What a rank > 0 does: the Trainer's bars are created disabled there.
    bar = auto.tqdm(total=10, disable=True)
    bar.close()
    leaked = _monitors()
    assert leaked and all(t.daemon for t in leaked)  # the tqdm behaviour the module exists for
    assert _shutdown.stop_progress_monitors() == len(leaked)
    assert not _monitors() and not any(t.is_alive() for t in leaked)


def test_an_open_bar_keeps_working_after_its_monitor_is_stopped():
    out = io.StringIO()
    bar = auto.tqdm(total=3, file=out, mininterval=0)
    bar.update(1)
    assert _monitors()
    assert _shutdown.stop_progress_monitors() >= 1 and not _monitors()
    bar.update(2)
    bar.close()
    assert "3/3" in out.getvalue()
    second = auto.tqdm(total=1, file=out)  # a later bar starts a fresh monitor, which stopping handles again
    assert _monitors()
    second.close()
    _shutdown.stop_progress_monitors()
    assert not _monitors()


def test_nothing_to_stop_is_fine():
    _shutdown.stop_progress_monitors()
    assert _shutdown.stop_progress_monitors() == 0


_SCRIPT = """
import atexit, sys, threading, time
from hf_optim.runner import _shutdown
atexit.register(lambda: print("exit hook ran", flush=True))
threading.Thread(target=time.sleep, args=(3600,)).start()  # a normal exit would wait for this thread
sys.stdout.write("unflushed result line")
_shutdown.end_launched_process(3)
print("returned")
sys.exit(0)
"""


def _run(world_size: str | None, script: str = _SCRIPT) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "WORLD_SIZE"}
    if world_size is not None:
        env["WORLD_SIZE"] = world_size
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)


def test_a_launched_rank_ends_at_once_with_its_code_hooks_run_and_output_flushed():
    done = _run("2")
    assert done.returncode == 3, done.stderr
    assert done.stdout.startswith("unflushed result line") and "exit hook ran" in done.stdout
    assert "returned" not in done.stdout


@pytest.mark.parametrize("world_size", [None, "1"])
def test_a_single_process_run_keeps_the_normal_exit(world_size):
    done = _run(world_size, _SCRIPT.replace("threading.Thread(target=time.sleep, args=(3600,)).start()", ""))
    assert done.returncode == 0 and "returned" in done.stdout and "exit hook ran" in done.stdout, done.stderr
