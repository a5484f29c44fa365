"""Compatibility name: RMSProp lives in :mod:`hf_optim.optim.rmsprop`; ``hf_optim.rmsprop`` is that same module object,
so imports, attributes and patches through either name agree."""

import sys

from .optim import rmsprop as _module

sys.modules[__name__] = _module
