"""Run a multi-process launcher (``accelerate launch``, ``torchrun``) from a test so that it cannot hang or leak.

Why a harness and not ``subprocess.run(..., timeout=...)``:

- ``subprocess.run`` kills only its direct child (the launcher) on timeout, with SIGKILL, so the launcher cannot
  stop its workers; and torch's elastic agent starts every rank in a *new session* (``start_new_session=True`` in
  ``torch.distributed.elastic.multiprocessing.subprocess_handler``), so even killing the launcher's process group
  leaves the ranks alive. A hung rank then survives the test as an orphan.
- ``capture_output=True`` waits for EOF on the pipes: a surviving rank that inherited them blocks the test until its
  own timeout, and the test never sees the rank's output.

Here every process the launcher starts carries a marker in its environment (``HF_OPTIM_TEST_LAUNCH=<uuid>``, which
torch and accelerate copy into each worker's environment), so the harness finds the ranks by scanning ``/proc``
whatever their session or parent. Output goes to files, not pipes. On timeout each rank gets SIGABRT first (with
``PYTHONFAULTHANDLER=1`` Python prints every thread's stack: the failure message shows *where* each rank waits),
then everything left gets SIGKILL. Where ``gdb`` is installed, each rank's native stacks are taken first (a rank
stuck in C++ teardown at interpreter exit has no Python frame to show). After a normal exit, any marked process still alive is killed and reported: a
launcher that returns while a rank lives on is a failure, not a pass.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

MARKER = "HF_OPTIM_TEST_LAUNCH"


def free_port() -> int:
    """A TCP port nobody listens on now (bound to port 0 and released: a launcher binds it again right away).

    ``accelerate launch`` defaults to port 29500: two launches at once (parallel pytest workers, other users of the
    machine) would otherwise collide.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Launch:
    """The outcome of :func:`run`: return code, full output, seconds, and any process killed after the launcher."""

    returncode: int
    stdout: str
    stderr: str
    seconds: float
    leftovers: list[str] = field(default_factory=list)

    def tail(self, chars: int = 4000) -> str:
        # faulthandler's list of loaded extension modules is one ~4 kB line that would push the stacks out
        stderr = "\n".join(line for line in self.stderr.splitlines() if not line.startswith("Extension modules:"))
        return (
            f"--- stdout (last {chars} chars) ---\n{self.stdout[-chars:]}\n"
            f"--- stderr (last {chars} chars) ---\n{stderr[-chars:]}"
        )


def marked_pids(marker: str) -> list[int]:
    """Live processes whose environment holds ``HF_OPTIM_TEST_LAUNCH=marker`` (own user's processes only)."""
    needle = f"{MARKER}={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rpartition(")")[2].split()[0]
        except OSError:  # gone meanwhile, or another user's process
            continue
        if state != "Z" and needle in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    """Whether ``pid`` still exists as a process that has not finished exiting (zombies and dead count as gone).

    Not the same as "no longer marked": a killed process loses its environment (so :func:`marked_pids` stops
    seeing it) while the kernel still tears it down, before it becomes a zombie; under load that window is long
    enough for a check right after to find it running.
    """
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _wait_dead(pids: Sequence[int], seconds: float) -> list[int]:
    """Wait until none of ``pids`` is :func:`_alive` (or ``seconds`` pass); the ones still alive."""
    deadline = time.monotonic() + seconds
    while (alive := [pid for pid in pids if _alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive


def _native_stacks(pid: int, chars: int = 12000) -> str:
    """The main thread's C/C++ stack of ``pid``, then every thread's top frames, from ``gdb`` (empty when gdb is
    missing, fails or takes too long)."""
    gdb = shutil.which("gdb")
    if gdb is None:
        return ""
    try:
        done = subprocess.run(
            [gdb, "-p", str(pid), "-batch", "-nx", "-ex", "thread apply 1 bt 40", "-ex", "thread apply all bt 15"],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    frames = [line for line in done.stdout.splitlines() if line.startswith(("Thread ", "#"))]
    return "\n    ".join(["native stacks (gdb):", *frames])[:chars]


def _describe(pid: int) -> str:
    try:
        cmdline = (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        return f"{pid}: {cmdline[:200]}"
    except OSError:
        return f"{pid}: (exited)"


def _signal_all(pids: Sequence[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _wait_gone(marker: str, seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while (alive := marked_pids(marker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


def _kill_tree(proc: subprocess.Popen, marker: str) -> list[str]:
    """Stop the launcher and every marked process: SIGABRT to the workers (stack dumps), then SIGKILL to all."""
    workers = [pid for pid in marked_pids(marker) if pid != proc.pid]
    described = [f"{_describe(pid)}\n    {_native_stacks(pid)}".rstrip() for pid in workers]
    _signal_all(workers, signal.SIGABRT)
    _wait_gone_except(marker, proc.pid, 5.0)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    remaining = marked_pids(marker)
    _signal_all(remaining, signal.SIGKILL)
    proc.wait()
    _wait_dead([*workers, *remaining], 10.0)
    return described


def _wait_gone_except(marker: str, keep: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while any(pid != keep for pid in marked_pids(marker)) and time.monotonic() < deadline:
        time.sleep(0.1)


def run(
    cmd: Sequence[str],
    *,
    timeout: float,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    check: bool = True,
) -> Launch:
    """Run ``cmd`` (a launcher) in its own session; never leave a process behind.

    Fails the test (``pytest.fail``) with the ranks' last output and stacks when it runs past ``timeout`` seconds,
    or when a process it started is still alive after it returned. With ``check=True`` a non-zero exit fails too.
    """
    marker = uuid.uuid4().hex
    full_env = {**(os.environ if env is None else env), MARKER: marker, "PYTHONFAULTHANDLER": "1"}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.monotonic()
        proc = subprocess.Popen(
            list(cmd),
            cwd=cwd,
            env=full_env,
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            text=True,
        )
        timed_out, killed = False, []
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            killed = _kill_tree(proc, marker)
        finally:
            if proc.poll() is None:  # e.g. KeyboardInterrupt while waiting
                _kill_tree(proc, marker)
        seconds = time.monotonic() - start
        leftovers = []
        if not timed_out:
            # Give ranks that are exiting a moment, then kill whatever is still there.
            survivors = _wait_gone(marker, 5.0)
            leftovers = [_describe(pid) for pid in survivors]
            _signal_all(survivors, signal.SIGKILL)
            _wait_dead(survivors, 10.0)
        out.seek(0)
        err.seek(0)
        result = Launch(proc.returncode, out.read(), err.read(), seconds, leftovers)
    command = " ".join(str(c) for c in cmd)
    if timed_out:
        pytest.fail(
            f"timed out after {timeout:.0f} s: {command}\nprocesses still running then (sent SIGABRT for a "
            f"stack dump, then SIGKILL):\n  "
            + "\n  ".join(killed or ["none besides the launcher"])
            + f"\n{result.tail()}",
            pytrace=False,
        )
    if leftovers:
        pytest.fail(
            f"the launcher exited ({proc.returncode}) but left processes alive (killed now):\n  "
            + "\n  ".join(leftovers)
            + f"\n{command}\n{result.tail()}",
            pytrace=False,
        )
    if check and result.returncode != 0:
        pytest.fail(f"exit code {result.returncode} after {seconds:.0f} s: {command}\n{result.tail()}", pytrace=False)
    return result


def torchrun_two_ranks(script: str | Path, *, timeout: float = 300) -> Launch:
    """``script`` on two CPU ranks under ``torch.distributed.run --standalone`` (its rendezvous binds a free port
    itself, localhost:0, so parallel launches cannot collide), one thread each, offline, from the repository root;
    the harness kills every rank on timeout and fails on a rank left behind."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    return run(cmd, env=env, timeout=timeout, cwd=Path(__file__).parent.parent)
