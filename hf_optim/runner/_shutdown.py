"""Ending ``hf-optim train``: no Python daemon thread left for the interpreter's finalization, and a launched rank
ends without finalization at all.

Python runs ``atexit`` hooks, then finalizes; a daemon thread that wakes and takes the GIL after that point is
killed with ``pthread_exit`` (3.11-3.13), a path with known hangs and aborts of the whole process (CPython
gh-87135, gh-91414; the 3.14 fix hangs such threads for good instead). A finished Trainer run leaves exactly one
such thread: tqdm's ``tqdm_monitor``. tqdm starts it with the first bar and stops it when its last bar closes, but a
bar created disabled (every rank but 0, ``disable_tqdm``) skips that bookkeeping, so the thread lives until exit,
where tqdm's own ``atexit`` hook wakes it: right into the finalization race.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading


def stop_progress_monitors() -> int:
    """Join tqdm's monitor threads while the interpreter is fully alive; how many were running.

    Safe at any point: a later bar starts a fresh monitor (tqdm restarts one whose predecessor was told to exit).
    """
    monitor_module = sys.modules.get("tqdm._monitor")
    if monitor_module is None:  # tqdm never imported: no bar, no monitor
        return 0
    stopped = 0
    for thread in threading.enumerate():
        if isinstance(thread, monitor_module.TMonitor) and thread is not threading.current_thread():
            thread.exit()  # sets its event and joins; the monitor wakes within its sleep interval at most
            if getattr(thread.tqdm_cls, "monitor", None) is thread:
                thread.tqdm_cls.monitor = None
            stopped += 1
    return stopped


#: What a launched rank holds until :func:`end_launched_process` (see :func:`keep_until_exit`).
_KEPT: list[object] = []


def _world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def keep_until_exit(*objects: object) -> None:
    """Under a multi-process launcher, hold ``objects`` (the Trainer, which references the gloo process group through
    DDP's ``Reducer``) until this rank ends with :func:`end_launched_process`, so that the group is never torn down
    in-process.

    Freeing the last reference runs ``~ProcessGroupGloo`` with the GIL held, and that destructor joins gloo's
    ``runLoop`` thread; if the thread is still releasing a finished collective (``~AsyncAllgatherWork`` decrefs its
    tensors' Python objects) it waits for the GIL: a deadlock. Seen (gdb stacks): a rank of the 2-process DDP resume
    test beside a CPU burner, about one slow-suite run in twenty, hung as ``_train`` returned and its frame freed the
    Trainer (main thread in ``~ProcessGroupGloo`` -> ``thread::join``, ``pt_gloo_runloop`` in ``take_gil``), after
    ``destroy_process_group`` had already unregistered the group. ``os._exit`` never runs the destructor.
    """
    if _world_size() > 1:
        _KEPT.extend(objects)


def release_kept() -> None:
    """Drop what :func:`keep_until_exit` holds (an in-process caller that does not end the process)."""
    _KEPT.clear()


def end_launched_process(code: int) -> None:
    """Under a multi-process launcher (``WORLD_SIZE`` > 1) end this rank now, with ``code``; otherwise return.

    A rank that has finished (outputs written, process group destroyed) runs the exit hooks a normal exit runs
    (``atexit``: logging, experiment trackers), flushes its output and leaves with ``os._exit``, skipping the
    interpreter's finalization, where torch's C++ objects are torn down while gloo's worker threads may still need
    the GIL. Measured, not assumed: a rank of a 2-process DDP run under CPU load hung there after printing its
    results (main thread past the last line of ``main``, gloo's ``runLoop`` thread in ``take_gil`` from
    ``~AsyncAllgatherWork``), the pattern of pytorch/pytorch#190489; the launcher then waits for it forever.
    Single-process runs keep Python's normal exit.
    """
    if _world_size() <= 1:
        return
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed or broken stream must not turn success into a traceback
            stream.flush()
    os._exit(code)
