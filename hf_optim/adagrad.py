"""Compatibility name: AdaGrad lives in :mod:`hf_optim.optim.adagrad`; ``hf_optim.adagrad`` is that same module object,
so imports, attributes and patches through either name agree."""

import sys

from .optim import adagrad as _module

sys.modules[__name__] = _module
