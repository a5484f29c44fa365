"""Compatibility name: QK-clip lives in :mod:`hf_optim.optim.muon.qk_clip`; ``hf_optim.qk_clip`` is that same module
object, so imports, attributes and patches through either name agree."""

import sys

from .optim.muon import qk_clip as _module

sys.modules[__name__] = _module
