"""Compatibility name: SGDW lives in :mod:`hf_optim.optim.sgd`; ``hf_optim.sgd`` is that same module object, so
imports, attributes and patches through either name agree."""

import sys

from .optim import sgd as _module

sys.modules[__name__] = _module
