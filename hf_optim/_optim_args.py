"""``--optim_args`` → typed keyword arguments for an hf-optim optimizer.

transformers splits ``optim_args`` itself before any handler runs (``_parse_optim_args``: spaces removed, split on
``,`` then on ``=``; every value stays a string and a value holding ``,`` or ``=`` crashes there). So the syntax of
one value is chosen to survive that split:

=========================  ======================================  ======================================
written                    becomes                                 example
=========================  ======================================  ======================================
``true`` / ``false``       ``bool`` (also ``yes``/``no``/``1``/``0``  ``nesterov=true``
                           for a knob whose default is a bool)
``none`` / ``null``        ``None``                                ``clip_threshold=none``
integer / float literal    ``int`` / ``float`` (``int`` → ``float``  ``eps=1e-7``, ``momentum=0.9``
                           where the knob's default is a float)
``a:b[:c...]``             ``tuple`` of the converted parts        ``betas=0.9:0.95``
anything else              ``str`` (modes, presets)                ``weight_decay_mode=independent``
=========================  ======================================  ======================================

The converted value must then be of a type the knob takes (:func:`knob_kinds`): ``beta1=abc`` is refused with
"beta1 must be a float or none", not passed on to fail inside the optimizer.

The valid keys are the keyword parameters of the optimizer class' ``__init__`` (so a new knob is reachable without
touching this file) plus the handler's own keys (:data:`HANDLER_KEYS`). ``lr`` and ``weight_decay`` are set with
``--learning_rate`` / ``--weight_decay`` (the Trainer writes ``weight_decay`` into its decay / no-decay groups, so a
second source would be silently ignored for one of them) and are refused here.
"""

from __future__ import annotations

import inspect
import re
import sys
from collections.abc import Mapping
from typing import Any

from mup_integration.vocabulary import DEFAULT_WD_RULE
from mup_integration.vocabulary import WD_RULES as MUP_WD_RULES

from ._validation import check_choice, closest

#: Keys understood by the Trainer handler itself, with their defaults.
HANDLER_KEYS: dict[str, Any] = {"mup": None, "mup_wd_rule": DEFAULT_WD_RULE, "groups": None, "layer_decay": None}
# Spelling rules for the handler keys: flags take true/false, the rule a name.
HANDLER_DEFAULT_TYPES: dict[str, Any] = {"mup": False, "mup_wd_rule": "", "groups": "", "layer_decay": 0.0}

# Parameters of an optimizer's __init__ that are never knobs.
_NOT_KNOBS = frozenset({"self", "params", "param_overrides"})
# Set through TrainingArguments; see the module docstring.
_FROM_TRAINING_ARGS = {"lr": "--learning_rate", "weight_decay": "--weight_decay"}

_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?inf|nan", re.IGNORECASE)
_NAMED_KINDS: dict[str, type] = {
    "float": float,
    "int": int,
    "bool": bool,
    "str": str,
    "tuple": tuple,
    "Tuple": tuple,
    "None": type(None),
}
#: How an error names each kind (in this order).
_KIND_WORDS: dict[type, str] = {
    float: "a float",
    int: "an integer",
    bool: "true/false",
    str: "a name",
    tuple: "':'-separated numbers (e.g. 0.9:0.95)",
    type(None): "none",
}
_TRUE = ("true", "yes", "on")
_FALSE = ("false", "no", "off")


def knob_defaults(cls: type, preset: str | None = None) -> dict[str, Any]:
    """Knobs of ``cls`` and their defaults (``inspect.Parameter.empty`` if none).

    The keyword parameters of ``cls.__init__``; a class that takes ``**knobs`` over presets (Adafactor) also
    publishes ``KNOBS`` (names) and ``PRESETS`` (name → defaults), as class attributes or in its module, and the
    defaults then come from ``preset`` (or the ``preset`` parameter's default).
    """
    signature = inspect.signature(cls.__init__)
    params = signature.parameters
    result = {
        name: p.default
        for name, p in params.items()
        if name not in _NOT_KNOBS and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        module = sys.modules.get(cls.__module__)
        knobs = getattr(cls, "KNOBS", None) or getattr(module, "KNOBS", ())
        presets = getattr(cls, "PRESETS", None) or getattr(module, "PRESETS", {})
        if preset is None and "preset" in params:
            preset = params["preset"].default
        values = presets.get(preset, {}) if isinstance(preset, str) else {}
        for name in knobs:
            result.setdefault(name, values.get(name, inspect.Parameter.empty))
    return result


def parse_value(text: str) -> Any:
    """Convert one ``optim_args`` value by its spelling (see the module docstring)."""
    if ":" in text:
        return tuple(parse_value(part) for part in text.split(":"))
    lowered = text.strip().lower()
    if lowered in ("none", "null"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    if _INT.fullmatch(text.strip()):
        return int(text)
    if _FLOAT.fullmatch(text.strip()):
        return float(text)
    return text


def _coerce(key: str, value: Any, default: Any, text: str) -> Any:
    """Adjust a parsed value to the type of the knob's default where the spelling is ambiguous."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if text.strip().lower() in (*_TRUE, "1"):
            return True
        if text.strip().lower() in (*_FALSE, "0"):
            return False
        raise ValueError(f"optim_args {key}={text!r}: {key} is a flag, write {key}=true or {key}=false.")
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, tuple) and isinstance(value, tuple):
        # Tuple knobs (betas, eps pairs) hold floats: "0:0.99" means (0.0, 0.99).
        return tuple(float(x) if isinstance(x, int) and not isinstance(x, bool) else x for x in value)
    if isinstance(default, tuple) and value is not None and not isinstance(value, tuple):
        raise ValueError(
            f"optim_args {key}={text!r}: {key} takes {len(default)} values; separate them with ':' "
            f"(e.g. {key}={':'.join(str(d) for d in default)}), because ',' and '=' are taken by --optim_args."
        )
    return value


def knob_kinds(cls: type, key: str) -> frozenset[type]:
    """The Python types a knob's value may have (empty: unknown, not checked).

    Collected from every source of the knob's type: the annotation of ``cls.__init__`` (``float | None``), its
    default there (an unannotated integer default allows floats too), and its value in every preset (Adafactor's
    ``beta1`` is 0.9 in one preset and None in another). An integer value is accepted where a float is (``eps=1``
    means 1.0); ``None`` is never refused here, because whether a knob takes None (``clip_threshold=none``: no
    clipping) is the optimizer's own check.
    """
    kinds: set[type] = set()
    param = inspect.signature(cls.__init__).parameters.get(key)
    if param is not None and param.annotation is not param.empty:
        annotation = param.annotation
        text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", None) or str(annotation)
        text = re.sub(r"\[.*\]", "", text)  # tuple[float, float] -> tuple
        kinds |= {_NAMED_KINDS[name] for name in re.findall(r"\w+", text) if name in _NAMED_KINDS}
    if param is not None and param.default is not param.empty:
        default_kind = type(param.default)
        # An unannotated `momentum=0` says "a number", not "an integer".
        unannotated_int = default_kind is int and param.annotation is param.empty
        kinds |= {int, float} if unannotated_int else {default_kind}
    module = sys.modules.get(cls.__module__)
    presets = getattr(cls, "PRESETS", None) or getattr(module, "PRESETS", {})
    kinds |= {type(preset[key]) for preset in presets.values() if isinstance(preset, Mapping) and key in preset}
    return frozenset(kinds)


def _check_kind(key: str, value: Any, text: str, kinds: frozenset[type]) -> None:
    """Refuse a value whose type the knob never takes (``beta1=abc``), naming what it takes."""
    if not kinds or value is None:
        return
    numbers = {int, float} & kinds
    if isinstance(value, bool):
        ok = bool in kinds
    elif isinstance(value, int):
        ok = bool(numbers)
    elif isinstance(value, float):
        ok = float in kinds
    elif isinstance(value, tuple):
        # Tuple knobs hold numbers (betas); a name inside one (betas=0.9:abc) is a typo.
        ok = tuple in kinds and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value)
    else:
        ok = type(value) in kinds
    if not ok:
        allowed = " or ".join(_KIND_WORDS[kind] for kind in _KIND_WORDS if kind in kinds)
        raise ValueError(f"optim_args {key}={text!r}: {key} must be {allowed}, not {_describe(value)}.")


def _describe(value: Any) -> str:
    if isinstance(value, tuple):
        return f"the tuple {value!r}"
    return f"{_KIND_WORDS.get(type(value), type(value).__name__)} ({value!r})"


def parse_optim_args(
    optim_args: Mapping[str, str] | str | None, cls: type, *, optim_name: str, preset: str | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split and convert ``optim_args`` into ``(optimizer_kwargs, handler_options)``.

    ``optim_args`` is transformers' already split ``{key: value_string}`` (or a raw ``"k=v,k=v"`` string, split here
    the same way). ``preset`` is the spec's default preset (for knob types). Unknown keys raise a ``ValueError`` listing the valid keys and the closest one.
    """
    if isinstance(optim_args, str) or optim_args is None:
        optim_args = split_optim_args(optim_args)
    preset = optim_args.get("preset", preset)
    defaults = knob_defaults(cls, preset if isinstance(preset, str) else None)
    valid = sorted({*defaults, *HANDLER_KEYS} - set(_FROM_TRAINING_ARGS))
    kwargs: dict[str, Any] = {}
    options: dict[str, Any] = dict(HANDLER_KEYS)
    for key, text in optim_args.items():
        if not isinstance(text, str):  # already typed (e.g. a dict passed programmatically)
            value = text
            text = str(text)
        else:
            value = parse_value(text)
        if key in _FROM_TRAINING_ARGS:
            raise ValueError(
                f"optim_args {key}={text!r}: set {key} with {_FROM_TRAINING_ARGS[key]} (TrainingArguments), "
                f"not in --optim_args."
            )
        if key in HANDLER_KEYS:
            default = HANDLER_DEFAULT_TYPES[key]
            raw = optim_args[key]
            # A rule is a name: keep the text, so that `mup_wd_rule=none` is the rule "none", not None.
            options[key] = (
                raw.strip() if isinstance(default, str) and isinstance(raw, str) else _coerce(key, value, default, text)
            )
            continue
        if key not in defaults:
            raise ValueError(
                f"Unknown optim_args key {key!r} for --optim {optim_name} ({cls.__name__}). "
                f"Valid keys: {valid}.{closest(key, valid)}"
            )
        try:
            kwargs[key] = _coerce(key, value, defaults[key], text)
        except OverflowError:  # an integer literal beyond float range, for a float knob
            raise ValueError(f"optim_args {key}={text!r}: {key} is too large for a float.") from None
        _check_kind(key, kwargs[key], text, knob_kinds(cls, key))
    check_choice("optim_args mup_wd_rule", options["mup_wd_rule"], MUP_WD_RULES)
    from .param_rules import check_layer_decay, parse_rules

    parse_rules(options["groups"], "optim_args groups")  # a missing or malformed rules file fails at parsing
    check_layer_decay(options["layer_decay"])
    if options["mup"] is not None and not isinstance(options["mup"], bool):
        raise ValueError(f"optim_args mup={options['mup']!r}: write mup=true or mup=false.")
    return kwargs, options


def split_optim_args(text: str | None) -> dict[str, str]:
    """``"a=1,b=x"`` → ``{"a": "1", "b": "x"}``, like transformers but with a clear error for a malformed item."""
    if not text:
        return {}
    result: dict[str, str] = {}
    for item in text.replace(" ", "").split(","):
        if not item:
            raise ValueError(
                f"optim_args {text!r} has an empty item (a doubled or trailing ','): write key=value items "
                "separated by single commas, tuples with ':' (e.g. betas=0.9:0.95)."
            )
        key, sep, value = item.partition("=")
        if not sep or not key or "=" in value:
            raise ValueError(
                f"optim_args item {item!r} must look like key=value (items separated by ',', tuples by ':')."
            )
        if result.get(key, value) != value:  # transformers' split keeps the last one silently
            raise ValueError(f"optim_args gives {key} twice ({key}={result[key]} and {key}={value}): give it once.")
        result[key] = value
    return result
