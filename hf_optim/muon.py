"""Compatibility name: Muon lives in :mod:`hf_optim.optim.muon.optimizer`; ``hf_optim.muon`` is that same module object,
so imports, attributes and patches through either name agree."""

import sys

from .optim.muon import optimizer as _module

sys.modules[__name__] = _module
