"""tests/_launch.py: a launcher that hangs, or returns while a rank it started (in another session) lives on, fails
the test with that rank's output and leaves no process behind."""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

import _launch
import pytest

SCRIPT = Path(__file__).parent / "scripts" / "hang_with_child.py"


def _alive(pid: int) -> bool:
    """Independent of the harness' own check: the process exists and is neither a zombie nor dead."""
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _pids(message: str) -> list[int]:
    return [int(p) for p in re.findall(r"pid (\d+)", message)]


def test_timeout_kills_the_rank_in_its_own_session_and_shows_its_output():
    with pytest.raises(pytest.fail.Exception) as failure:
        _launch.run([sys.executable, str(SCRIPT), "hang"], timeout=20)
    message = str(failure.value)
    assert "timed out after 20 s" in message
    assert "rank 1: waiting in the barrier" in message  # the rank's last output
    assert "Current thread" in message or "Thread 0x" in message, message  # its stack (faulthandler on SIGABRT)
    if shutil.which("gdb"):  # and its native stacks, taken before the SIGABRT
        assert "native stacks (gdb):" in message and "#0 " in message, message
    (child,) = _pids(message)
    assert not _alive(child) and child != os.getpid()


def test_launcher_that_leaves_a_rank_alive_fails_and_the_rank_is_killed():
    with pytest.raises(pytest.fail.Exception) as failure:
        _launch.run([sys.executable, str(SCRIPT), "orphan"], timeout=60)
    message = str(failure.value)
    assert "left processes alive" in message and "time.sleep(3600)" in message
    (child,) = _pids(message)
    assert not _alive(child)


def test_clean_run_returns_output_and_exit_code():
    result = _launch.run([sys.executable, "-c", "print('hello')"], timeout=60)
    assert result.returncode == 0 and result.stdout == "hello\n" and not result.leftovers
    with pytest.raises(pytest.fail.Exception, match="exit code 3"):
        _launch.run([sys.executable, "-c", "import sys; sys.exit(3)"], timeout=60)
    assert _launch.run([sys.executable, "-c", "import sys; sys.exit(3)"], timeout=60, check=False).returncode == 3


def test_free_port_is_bindable():
    import socket

    port = _launch.free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
