"""hf-optim: adaptive optimizers with explicit weight-decay and epsilon semantics, as a Hugging Face Trainer plugin.

Public API: :func:`create_optimizer` (the one way every entry point builds an optimizer), the optimizer classes,
:func:`register_optimizer`, :func:`list_optimizers` and :class:`OptimizerSpec`. Classes and the factory are imported
lazily so that ``import hf_optim`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from .registry import OptimizerSpec, get_spec, list_optimizers, register_optimizer

__version__ = "0.1.0"

_LAZY = {
    "Adam": "hf_optim.optim.adam.optimizers",
    "AdamW": "hf_optim.optim.adam.optimizers",
    "AdamAtan2": "hf_optim.optim.adam.optimizers",
    "RAdam": "hf_optim.optim.adam.optimizers",
    "Adafactor": "hf_optim.optim.adafactor.optimizer",
    "SGDW": "hf_optim.optim.sgd",
    "AdaGrad": "hf_optim.optim.adagrad",
    "RMSProp": "hf_optim.optim.rmsprop",
    "Muon": "hf_optim.optim.muon.optimizer",
    "create_optimizer": "hf_optim.factory",
    "resolve_optimizer": "hf_optim.factory",
}

__all__ = [
    "SGDW",
    "AdaGrad",
    "Adafactor",
    "Adam",
    "AdamAtan2",
    "AdamW",
    "Muon",
    "OptimizerSpec",
    "RAdam",
    "RMSProp",
    "__version__",
    "create_optimizer",
    "get_spec",
    "list_optimizers",
    "register_optimizer",
    "resolve_optimizer",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hf_optim' has no attribute {name!r}")


def _install_trainer_hook() -> None:
    # Registers the --optim names with transformers now if it is loaded, else as soon as
    # transformers.training_args is imported (hf_optim.integrations.transformers.autoload). Never raises: the optimizer
    # classes must stay usable (Trainer(optimizer_cls_and_kwargs=...)) even when the transformers internals changed.
    from .integrations.transformers import autoload as _autoload

    _autoload.install()


_install_trainer_hook()
