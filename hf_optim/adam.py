"""Compatibility name: the Adam family lives in :mod:`hf_optim.optim.adam.optimizers`; ``hf_optim.adam`` is that same
module object, so imports, attributes and patches through either name agree."""

import sys

from .optim.adam import optimizers as _module

sys.modules[__name__] = _module
