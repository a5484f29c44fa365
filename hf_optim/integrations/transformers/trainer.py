"""Hugging Face Trainer integration: every registry spec becomes an ``optim`` name.

transformers has no public optimizer registry, so registration touches three internals (checked by a guard):

* ``transformers.training_args.OptimizerNames``: each name is added as a real enum member (``_member_names_``,
  ``_member_map_``, ``_value2member_map_``, class attribute), so ``TrainingArguments(optim=...)``, the
  ``HfArgumentParser`` choices, ``to_dict()`` and unpickling ``training_args.bin`` all work;
* ``transformers.trainer_optimizer._OPTIMIZER_HANDLERS``: one handler per name, returning ``(OptimizerClass,
  kwargs)``, so ``Trainer.create_optimizer`` keeps its decay / no-decay groups;
* ``transformers.trainer.DEFAULT_CALLBACKS``:
  :class:`~hf_optim.integrations.transformers.group_logging.GroupLoggingCallback`, which adds ``lr/group_i``,
  ``wd/group_i`` and ``decay/group_i`` to the logs when the optimizer is an hf-optim one.

Each step runs as soon as its module has executed (see :mod:`hf_optim.integrations.transformers.autoload`); all steps
are idempotent.

Fallback for a transformers version the guard rejects (or for full control)::

    from hf_optim.integrations.transformers.trainer import optimizer_cls_and_kwargs
    trainer = Trainer(model, args, optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(
        "adafactor_v2", args, model, optim_args="weight_decay_mode=independent"))
    # or by hand: Trainer(..., optimizer_cls_and_kwargs=(hf_optim.AdamW, {"lr": 1e-3, "betas": (0.9, 0.95)}))

How ``TrainingArguments`` map: ``--learning_rate`` → ``lr``; ``--weight_decay`` → the decay group's
``weight_decay`` (the no-decay group gets 0, as for every Trainer optimizer); ``--adam_beta1/2`` → ``betas`` and
``--adam_epsilon`` → ``eps`` only for specs with ``adam_args=True`` whose class has those parameters (Adam, AdamW,
RAdam; AdamAtan2 has no ``eps``). Adafactor, SGDW, AdaGrad and RMSProp take their own knobs from ``--optim_args``
(``beta1=...``, ``momentum=...``, ``alpha=...``). ``--optim_args`` wins over the mapped values.
"""

from __future__ import annotations

import dataclasses
import enum
import sys
import warnings
from types import ModuleType
from typing import Any

import hf_optim.registry as registry
from hf_optim._optim_args import split_optim_args
from hf_optim.registry import OptimizerSpec

from . import fail_fast

SUPPORTED_TRANSFORMERS = (
    "transformers >= 5.2 (releases that ship transformers/trainer_optimizer.py with _OPTIMIZER_HANDLERS; "
    "tested with 5.24.0)"
)
FALLBACK = (
    "Use hf-optim without registration: Trainer(..., optimizer_cls_and_kwargs="
    "hf_optim.integrations.transformers.trainer.optimizer_cls_and_kwargs('adafactor_v2', args, model)) or "
    "Trainer(..., optimizer_cls_and_kwargs=(hf_optim.AdamW, {'lr': 1e-3}))."
)
_OPTIMIZER_CONTEXT_FIELDS = {"args", "model", "optimizer_kwargs", "adam_kwargs", "optim_args"}
#: ``OptimizerNames`` values this package added (so that a failed check can take exactly those back).
_ADDED: set[str] = set()


class TransformersIncompatibleError(RuntimeError):
    """The transformers internals used for registration are missing or changed."""


def _incompatible(what: str) -> TransformersIncompatibleError:
    import importlib.metadata

    try:
        installed = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        installed = "unknown"
    return TransformersIncompatibleError(
        f"hf-optim cannot register its --optim names with transformers {installed}: {what}. "
        f"Supported: {SUPPORTED_TRANSFORMERS}. {FALLBACK}"
    )


# --- the guard ------------------------------------------------------------------------------------------------------


def check_training_args(module: ModuleType) -> type[enum.Enum]:
    names = getattr(module, "OptimizerNames", None)
    if not (isinstance(names, type) and issubclass(names, enum.Enum) and issubclass(names, str)):
        raise _incompatible("transformers.training_args.OptimizerNames is missing or not a str Enum")
    for attr, kind in (("_member_names_", list), ("_member_map_", dict), ("_value2member_map_", dict)):
        if not isinstance(getattr(names, attr, None), kind):
            raise _incompatible(f"OptimizerNames.{attr} is not a {kind.__name__}")
    return names


def check_trainer_optimizer(module: ModuleType) -> dict[Any, Any]:
    handlers = getattr(module, "_OPTIMIZER_HANDLERS", None)
    if not isinstance(handlers, dict):
        raise _incompatible("transformers.trainer_optimizer._OPTIMIZER_HANDLERS is missing or not a dict")
    context = getattr(module, "OptimizerContext", None)
    fields = {f.name for f in dataclasses.fields(context)} if dataclasses.is_dataclass(context) else set()
    if not fields >= _OPTIMIZER_CONTEXT_FIELDS:
        raise _incompatible(
            f"transformers.trainer_optimizer.OptimizerContext lacks fields {sorted(_OPTIMIZER_CONTEXT_FIELDS - fields)}"
        )
    return handlers


# --- enum members and handlers ----------------------------------------------------------------------------------


def _add_member(names: type[enum.Enum], value: str) -> enum.Enum:
    """Add ``value`` to the ``OptimizerNames`` enum as a genuine member (idempotent)."""
    existing = names._value2member_map_.get(value)
    if existing is not None:
        return existing
    member_name = value.upper()
    if member_name in names._member_map_ or hasattr(names, member_name):
        member_name = f"HF_OPTIM_{member_name}"
    _ADDED.add(value)
    member = str.__new__(names, value)
    member._name_ = member_name
    member._value_ = value
    member.__objclass__ = names
    member._sort_order_ = len(names._member_names_)
    # type.__setattr__: EnumType.__setattr__ refuses to (re)bind member names.
    type.__setattr__(names, member_name, member)
    names._member_names_.append(member_name)
    names._member_map_[member_name] = member
    names._value2member_map_[value] = member
    return member


def _remove_members(names: type[enum.Enum], values: list[str]) -> None:
    """Undo :func:`_add_member` for ``values`` that this package added (never touches transformers' own names)."""
    for value in values:
        member = names._value2member_map_.get(value)
        if member is None or value not in _ADDED:
            continue
        names._member_names_.remove(member._name_)
        del names._member_map_[member._name_]
        del names._value2member_map_[value]
        type.__delattr__(names, member._name_)
        _ADDED.discard(value)


def _make_handler(spec_name: str) -> Any:
    def handler(ctx: Any) -> tuple[type, dict[str, Any]]:
        return optimizer_cls_and_kwargs(spec_name, ctx.args, ctx.model, optim_args=ctx.optim_args)

    handler.hf_optim_spec = spec_name  # marks the handler as ours (idempotent re-registration may replace it)
    handler.__name__ = handler.__qualname__ = f"hf_optim_{spec_name}_handler"
    return handler


def _add_handler(handlers: dict[Any, Any], member: enum.Enum, spec: OptimizerSpec) -> None:
    current = handlers.get(member)
    if current is not None and getattr(current, "hf_optim_spec", None) == spec.name:
        return
    if current is not None and getattr(current, "hf_optim_spec", None) is None:
        raise _incompatible(f"transformers already has its own optimizer named {spec.name!r}")
    handlers[member] = _make_handler(spec.name)


def _module_exists(name: str) -> bool:
    """Whether ``name`` can be imported (without importing it; its parent package is already loaded)."""
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _loaded(name: str, just_loaded: ModuleType | None = None) -> ModuleType | None:
    """The module if it has finished executing (or is the one whose execution just finished)."""
    if just_loaded is not None and just_loaded.__name__ == name:
        return just_loaded
    module = sys.modules.get(name)
    if module is None or getattr(getattr(module, "__spec__", None), "_initializing", False):
        return None
    return module


def _register(specs: list[OptimizerSpec], just_loaded: ModuleType | None = None) -> None:
    training_args = _loaded("transformers.training_args", just_loaded)
    if training_args is None:
        return  # nothing to do before the enum exists; the hook calls again
    names = check_training_args(training_args)
    if not _module_exists("transformers.trainer_optimizer"):
        # transformers < 5.2: names added to the enum would pass `--optim` parsing, then fail in create_optimizer
        raise _incompatible("transformers.trainer_optimizer (the optimizer handler table) does not exist")
    members = {spec.name: _add_member(names, spec.name) for spec in specs}
    fail_fast.install(training_args)  # --optim_args checked when TrainingArguments is built
    trainer_optimizer = _loaded("transformers.trainer_optimizer", just_loaded)
    if trainer_optimizer is not None:
        try:
            handlers = check_trainer_optimizer(trainer_optimizer)
            for spec in specs:
                _add_handler(handlers, members[spec.name], spec)
        except TransformersIncompatibleError:
            # Names without handlers would pass `--optim` parsing and fail later in create_optimizer.
            _remove_members(names, [spec.name for spec in specs])
            raise
    trainer = _loaded("transformers.trainer", just_loaded)
    if trainer is not None:
        _add_logging_callback(trainer)
        _check_optim_args_syntax_first(trainer)


def _add_logging_callback(trainer_module: ModuleType) -> None:
    callbacks = getattr(trainer_module, "DEFAULT_CALLBACKS", None)
    if not isinstance(callbacks, list):
        warnings.warn(
            "hf-optim: transformers.trainer.DEFAULT_CALLBACKS is missing; per-group lr/weight-decay logging needs "
            "Trainer(callbacks=[hf_optim.integrations.transformers.trainer.GroupLoggingCallback()]).",
            RuntimeWarning,
            stacklevel=2,
        )
        return
    from hf_optim.integrations.transformers.group_logging import GroupLoggingCallback

    if GroupLoggingCallback not in callbacks:
        callbacks.append(GroupLoggingCallback)


def _check_optim_args_syntax_first(trainer_module: ModuleType) -> None:
    """Make ``Trainer.get_optimizer_cls_and_kwargs`` check ``--optim_args`` syntax with our error for our names.

    transformers splits ``optim_args`` before any handler runs and a malformed item (``eps``, a trailing comma)
    crashes there with a bare unpacking error; for hf-optim names the same string is checked first by
    :func:`~hf_optim._optim_args.split_optim_args`, whose error says what a valid item looks like. Other names are
    untouched. If the method is missing, only the error message is less helpful, so nothing is raised.
    """
    trainer_cls = getattr(trainer_module, "Trainer", None)
    original = getattr(trainer_cls, "__dict__", {}).get("get_optimizer_cls_and_kwargs")
    if not isinstance(original, staticmethod) or getattr(original.__func__, "hf_optim_wrapped", False):
        return
    func = original.__func__

    def get_optimizer_cls_and_kwargs(args: Any, model: Any = None) -> tuple[Any, Any]:
        optim = getattr(args, "optim", None)
        if getattr(optim, "value", optim) in registry._REGISTRY:
            split_optim_args(getattr(args, "optim_args", None))
        return func(args, model)

    get_optimizer_cls_and_kwargs.__doc__ = func.__doc__
    get_optimizer_cls_and_kwargs.hf_optim_wrapped = True  # type: ignore[attr-defined]
    trainer_cls.get_optimizer_cls_and_kwargs = staticmethod(get_optimizer_cls_and_kwargs)


def register_with_transformers(spec: OptimizerSpec) -> None:
    """Register one spec with whatever parts of transformers are loaded (the hook does the rest later).

    Called by :func:`hf_optim.registry.register_optimizer` for specs added after import. Raises
    :class:`TransformersIncompatibleError` when the internals are missing.
    """
    _register([spec])


def register_all() -> None:
    """Import the transformers modules involved and register every spec now. Raises on incompatibility."""
    import importlib

    for name in ("transformers.training_args", "transformers.trainer_optimizer"):
        try:
            importlib.import_module(name)
        except ImportError as error:
            raise _incompatible(f"cannot import {name} ({error})") from error
    _register(registry.list_optimizers())


def on_module_loaded(module: ModuleType) -> None:
    """Hook callback: never raises into transformers' import; an incompatibility becomes a warning."""
    try:
        _register(registry.list_optimizers(), just_loaded=module)
    except Exception as error:
        warnings.warn(f"hf-optim: --optim names not registered: {error}", RuntimeWarning, stacklevel=2)


# --- the handler ------------------------------------------------------------------------------------------------


def optimizer_cls_and_kwargs(
    name: str, args: Any, model: Any = None, *, optim_args: Any = None
) -> tuple[type, dict[str, Any]]:
    """``(OptimizerClass, kwargs)`` for ``--optim name``: what the handler returns, usable as
    ``Trainer(optimizer_cls_and_kwargs=...)`` on any transformers version.

    Maps ``TrainingArguments`` onto :func:`hf_optim.factory.resolve_optimizer` (which decides everything else):
    ``--learning_rate`` → ``lr``, ``--weight_decay`` → ``weight_decay``, ``--adam_beta1/2`` / ``--adam_epsilon`` →
    ``betas`` / ``eps`` where the optimizer takes them and ``--optim_args`` does not set them. ``optim_args``
    defaults to ``args.optim_args`` (a ``"k=v,k=v"`` string or an already split dict).
    """
    from hf_optim.factory import resolve_optimizer

    spec = registry.get_spec(name)
    if optim_args is None:
        optim_args = getattr(args, "optim_args", None)
    if not spec.takes_eps and args.adam_epsilon != 1e-8:
        warnings.warn(f"--optim {name}: {spec.target} has no epsilon; --adam_epsilon is ignored.", stacklevel=3)
    fallback = {"betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon}
    return resolve_optimizer(
        name,
        model,
        lr=args.learning_rate,
        weight_decay=args.weight_decay,
        optim_args=optim_args,
        fallback_knobs=fallback,
        where=f"--optim {name}",
    )


registry.add_listener(register_with_transformers)


def __getattr__(name: str) -> Any:
    if name == "GroupLoggingCallback":  # needs transformers; imported on first use
        from hf_optim.integrations.transformers.group_logging import GroupLoggingCallback

        return GroupLoggingCallback
    raise AttributeError(f"module 'hf_optim.integrations.transformers.trainer' has no attribute {name!r}")
