"""How every ``hf-optim`` command ends on a user's mistake: exit 2 and one line on stderr, never a traceback wall.

The line names the command, the argument or file and what is allowed (the messages come from the checks that
raise). ``--debug`` on the command line (anywhere) or ``HF_OPTIM_DEBUG=1`` in the environment shows the traceback
instead; the environment variable also reaches the ranks an ``accelerate launch`` starts.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

DEBUG_FLAG = "--debug"
DEBUG_ENV = "HF_OPTIM_DEBUG"
#: What a user's mistake raises: a bad value or type (every check of this project), a file that cannot be read.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, OSError)


def take_debug_flag(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--debug``; seeing it sets :data:`DEBUG_ENV` for this process and its children."""
    rest = [a for a in argv if a != DEBUG_FLAG]
    if len(rest) != len(argv):
        os.environ[DEBUG_ENV] = "1"
    return rest


def debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def one_line(command: str, error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, OSError) and error.filename and str(error.filename) not in text:
        text = f"{error.filename}: {text}"
    return f"hf-optim {command}: {text} (--debug shows the traceback)"


def report(command: str, error: BaseException) -> int:
    """Print the one line for ``error`` and return the exit code 2; re-raise when debugging."""
    if debugging():
        raise error
    print(one_line(command, error), file=sys.stderr, flush=True)
    return 2
