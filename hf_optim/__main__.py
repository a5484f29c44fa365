"""``python -m hf_optim`` = the ``hf-optim`` command."""

import sys

from hf_optim.cli import main

sys.exit(main())
