"""Lazy post-import hook: register hf-optim's ``optim`` names when transformers loads the modules that need them.

Why a hook: transformers has no public optimizer registry. ``--optim`` choices are built from the
``OptimizerNames`` enum when ``HfArgumentParser`` is constructed, so a script that never imports ``hf_optim`` only
sees our names if they are added to the enum as soon as ``transformers.training_args`` has been executed, before the
script can build a parser. Handlers go into ``transformers.trainer_optimizer._OPTIMIZER_HANDLERS`` when *that*
module has been executed, and the group-logging callback into ``transformers.trainer.DEFAULT_CALLBACKS``. Each
target is handled separately because transformers imports them in different orders (``transformers.trainer``
imports ``trainer_optimizer``, which imports ``training_args``): touching a half-executed module would break it.

Two entry points install the same finder:

* ``hf_optim_autoload.pth`` (installed next to the package in site-packages) runs at interpreter start. It only
  checks the switch-off variable and puts a tiny trampoline on ``sys.meta_path``; this module (and ``hf_optim``) is
  imported only when the first of :data:`TARGETS` is imported (the trampoline must see all of them: importing
  ``transformers.trainer`` starts before ``training_args`` and would otherwise be missed). Set
  ``HF_OPTIM_DISABLE_AUTOLOAD=1`` to switch the ``.pth`` off.
* ``import hf_optim`` calls :func:`install` (explicit opt-in, not affected by the variable).

Nothing here may raise into transformers' own import: a failed registration becomes a warning (the explicit
``hf_optim.integrations.transformers.trainer.register_all()`` raises instead).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

ENV_DISABLE = "HF_OPTIM_DISABLE_AUTOLOAD"

#: Modules whose completed execution triggers a registration step (see ``trainer.on_module_loaded``).
TARGETS: frozenset[str] = frozenset(
    {"transformers.training_args", "transformers.trainer_optimizer", "transformers.trainer"}
)


def autoload_disabled(environ: Any = None) -> bool:
    """True when the switch-off variable is set to anything but ``""``/``"0"``/``"false"``."""
    import os

    value = (environ if environ is not None else os.environ).get(ENV_DISABLE, "")
    return value.strip().lower() not in ("", "0", "false", "no")


class _CallbackLoader:
    """Wraps a module's real loader; runs ``callback(module)`` right after the module body has executed."""

    def __init__(self, loader: Any, callback: Callable[[ModuleType], None]) -> None:
        self._loader = loader
        self._callback = callback

    def create_module(self, spec: Any) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        # Give the module its real loader back so that inspect/linecache/pickle see nothing unusual.
        module.__loader__ = self._loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._loader
        self._callback(module)

    def __getattr__(self, name: str) -> Any:  # get_source, is_package, get_filename, ...
        return getattr(self._loader, name)


def _on_loaded(module: ModuleType) -> None:
    # Imported here: hf_optim.integrations.transformers.trainer is only needed once transformers is being imported
    # anyway.
    from .trainer import on_module_loaded

    on_module_loaded(module)


class PostImportFinder:
    """A meta-path finder that never finds anything itself: it wraps the loader of the :data:`TARGETS`."""

    hf_optim_hook = True  # marker, so the trampoline from the .pth and this finder skip each other

    def __init__(self) -> None:
        self._busy: set[str] = set()

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in TARGETS or fullname in self._busy:
            return None
        self._busy.add(fullname)
        try:
            for finder in list(sys.meta_path):
                if getattr(finder, "hf_optim_hook", False) or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                        spec.loader = _CallbackLoader(spec.loader, _on_loaded)
                    return spec
            return None
        finally:
            self._busy.discard(fullname)


FINDER = PostImportFinder()


def install() -> None:
    """Put :data:`FINDER` first on ``sys.meta_path`` (idempotent) and register for modules already loaded."""
    if FINDER not in sys.meta_path:
        sys.meta_path.insert(0, FINDER)
    for name in sorted(TARGETS):
        module = sys.modules.get(name)
        if module is not None and not getattr(getattr(module, "__spec__", None), "_initializing", False):
            _on_loaded(module)


def find_spec_from_trampoline(fullname: str, path: Any = None, target: Any = None) -> Any:
    """Called by the ``.pth`` trampoline for a target module: install the real finder and delegate to it."""
    install()
    return FINDER.find_spec(fullname, path, target)
