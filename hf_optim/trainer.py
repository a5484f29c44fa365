"""Compatibility name: the Trainer plugin lives in :mod:`hf_optim.integrations.transformers.trainer`;
``hf_optim.trainer`` is that same module object, so imports, attributes and patches through either name agree."""

import sys

from .integrations.transformers import trainer as _module

sys.modules[__name__] = _module
