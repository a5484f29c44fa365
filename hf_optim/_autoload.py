"""Compatibility name: the post-import hook (named by .pth files of earlier installs) lives in
:mod:`hf_optim.integrations.transformers.autoload`; ``hf_optim._autoload`` is that same module object, so imports,
attributes and patches through either name agree."""

import sys

from .integrations.transformers import autoload as _module

sys.modules[__name__] = _module
