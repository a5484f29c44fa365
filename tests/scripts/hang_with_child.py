"""Stand-in for a launcher whose rank hangs: starts a child in a new session (as torch's elastic agent starts each
rank) that prints a line and sleeps; then, per argv[1], hangs too (``hang``) or exits 0 at once (``orphan``)."""

import subprocess
import sys
import time

CHILD = "import sys, time\nprint('rank 1: waiting in the barrier', flush=True)\ntime.sleep(3600)"
child = subprocess.Popen([sys.executable, "-c", CHILD], start_new_session=True)
print(f"launcher: started rank 1 as pid {child.pid}", flush=True)
time.sleep(3.0)  # let the child print before the parent may exit
if sys.argv[1] == "hang":
    time.sleep(3600)
sys.exit(0)
