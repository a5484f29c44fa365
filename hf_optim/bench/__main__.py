"""``python -m hf_optim.bench``: the same as ``hf-optim bench``."""

import sys

from . import main

sys.exit(main())
