"""Compatibility name: Adafactor lives in :mod:`hf_optim.optim.adafactor.optimizer`; ``hf_optim.adafactor`` is that same
module object, so imports, attributes and patches through either name agree."""

import sys

from .optim.adafactor import optimizer as _module

sys.modules[__name__] = _module
