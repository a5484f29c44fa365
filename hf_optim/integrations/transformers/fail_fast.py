"""Check ``--optim_args`` when ``TrainingArguments`` is built, not when the Trainer builds the optimizer.

Without this, a typo (``betta1=0.9``) or a bad value (``beta1=abc``) surfaces inside ``trainer.train()``, after the
script has tokenized its data and built its model. transformers has no validation hook for ``optim_args`` (it keeps
the raw string until ``Trainer.get_optimizer_cls_and_kwargs``), so :func:`install` wraps
``TrainingArguments.__post_init__``, which runs for direct construction, ``HfArgumentParser`` (it calls the dataclass
constructor) and ``dataclasses.replace``. The wrapper only acts when ``optim`` is an hf-optim name and
``optim_args`` is set; every other configuration is passed through untouched.

What is checked, in order (every failure is one :class:`OptimArgsError` line naming ``--optim_args``, the key, the
value and what is allowed):

1. syntax (``key=value`` items; :func:`~hf_optim._optim_args.split_optim_args`);
2. keys and value types against the optimizer class (:func:`~hf_optim._optim_args.parse_optim_args`);
3. the optimizer's own range and choice checks, by constructing it once on a single 2×2 zero tensor with the spec's
   defaults and the parsed knobs (construction only validates and stores the groups; no step, no state).

``--learning_rate``, ``--weight_decay`` and the muP options are not part of step 3: they are checked where the
optimizer is really built, together with the model.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from hf_optim import registry
from hf_optim._optim_args import parse_optim_args, split_optim_args


class OptimArgsError(ValueError):
    """A bad ``--optim_args`` for an hf-optim ``--optim`` name, reported while the arguments are built."""


def check_optim_args(optim: Any, optim_args: Any) -> None:
    """Raise :class:`OptimArgsError` if ``optim_args`` cannot configure the hf-optim optimizer ``optim``.

    ``optim`` is an ``OptimizerNames`` member or its string value; names that are not hf-optim's are ignored, and so
    is an empty ``optim_args``.
    """
    name = getattr(optim, "value", optim)
    if not isinstance(name, str) or name not in registry._REGISTRY or not optim_args:
        return
    spec = registry.get_spec(name)
    try:
        cls = spec.resolve()
    except Exception:  # an unresolvable target is reported where the optimizer is built
        return
    try:
        if not isinstance(optim_args, (str, Mapping)):
            raise TypeError(f"optim_args must be a 'key=value,...' string, got {type(optim_args).__name__}.")
        items = split_optim_args(optim_args) if isinstance(optim_args, str) else dict(optim_args)
        kwargs, _options = parse_optim_args(items, cls, optim_name=name, preset=spec.defaults.get("preset"))
        _dry_build(cls, {**spec.defaults, **kwargs})
    except (ValueError, TypeError, OverflowError) as error:
        reason = " ".join(str(error).split())  # one line, whatever the optimizer's message looked like
        raise OptimArgsError(f"--optim_args {_show(optim_args)} for --optim {name}: {reason}") from error


def _show(optim_args: Any) -> str:
    if isinstance(optim_args, Mapping):
        return repr(",".join(f"{k}={v}" for k, v in optim_args.items()))
    return repr(optim_args)


def _dry_build(cls: type, kwargs: dict[str, Any]) -> None:
    """Construct ``cls`` once on a throw-away tensor: its constructor checks ranges and choices of every knob."""
    import torch

    param = torch.zeros(2, 2, requires_grad=True)
    with warnings.catch_warnings():
        # Preset notes (e.g. relative_step) are for the real construction; here only errors matter.
        warnings.simplefilter("ignore")
        cls([param], **kwargs)


def install(training_args_module: ModuleType) -> bool:
    """Wrap ``TrainingArguments.__post_init__`` so that it ends with :func:`check_optim_args` (idempotent).

    Returns whether the check is in place. A transformers whose ``TrainingArguments`` has no ``__post_init__`` of
    its own is left alone (the same errors then come from the Trainer, later): this hook must never break it.
    """
    cls = getattr(training_args_module, "TrainingArguments", None)
    original = getattr(cls, "__dict__", {}).get("__post_init__")
    if not callable(original):
        return False
    if getattr(original, "hf_optim_wrapped", False):
        return True

    def __post_init__(self: Any, *args: Any, **kwargs: Any) -> Any:
        # After transformers' own checks: an unknown --optim is theirs to report, and `optim` is then an enum member.
        result = original(self, *args, **kwargs)
        check_optim_args(getattr(self, "optim", None), getattr(self, "optim_args", None))
        return result

    __post_init__.__doc__ = original.__doc__
    __post_init__.__wrapped__ = original  # type: ignore[attr-defined]
    __post_init__.hf_optim_wrapped = True  # type: ignore[attr-defined]
    # A plain class attribute: dataclasses' generated __init__ looks __post_init__ up on the instance at call time, and
    # subclasses (Seq2SeqTrainingArguments, TRL configs) reach it through super().__post_init__().
    cls.__post_init__ = __post_init__
    return True
