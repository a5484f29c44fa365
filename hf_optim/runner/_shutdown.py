"""Ending ``hf-optim train`` with no Python daemon thread left for the interpreter's finalization.

Python runs ``atexit`` hooks, then finalizes; a daemon thread that wakes and takes the GIL after that point is
killed with ``pthread_exit`` (3.11-3.13), a path with known hangs and aborts of the whole process (CPython
gh-87135, gh-91414; the 3.14 fix hangs such threads for good instead). A finished Trainer run leaves exactly one
such thread: tqdm's ``tqdm_monitor``. tqdm starts it with the first bar and stops it when its last bar closes, but a
bar created disabled (every rank but 0, ``disable_tqdm``) skips that bookkeeping, so the thread lives until exit,
where tqdm's own ``atexit`` hook wakes it: right into the finalization race.
"""

from __future__ import annotations

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
