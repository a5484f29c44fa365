r"""Checked ``load_state_dict``: every saved group and state tensor is checked against the live optimizer *before*
anything is loaded, so no implementation (the C Adafactor kernel, torch's fused Adam kernels, a compiled graph) can
ever run on state of the wrong shape.

Why: ``torch.optim.Optimizer.load_state_dict`` maps saved state to parameters by position and checks only the
number of parameters per group. State saved with the groups in another order, or for another model, is loaded
silently; the first step then reads and writes out of bounds in the C and fused kernels (a crash of the process:
``free(): invalid next size``) or runs on transposed statistics (equal element counts, 8×4 vs 4×8).

:func:`prepare` returns a new state dict (the caller's is not modified):

1. the structure (``state``, ``param_groups``, equal group and parameter counts);
2. each group is recognised as hf-optim's own (knobs a group lacks keep the live optimizer's values) or as a foreign
   format the class accepts (:mod:`hf_optim._interop`: torch's and transformers' classes), else a ``ValueError``
   says what the class can load; the resulting knobs pass the class's own validation;
3. each parameter's state: only keys the class keeps for that parameter (:meth:`BaseOptimizer._state_specs`), each
   tensor of the expected shape (the local shard's, under FSDP2) and kind (complex exactly for moments of complex
   parameters, real floating for statistics), the step a finite number >= 0. A shape mismatch names the group, the
   parameter index, both shapes and the likely cause.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch

from ._distributed import local
from ._interop import FORMATS, NATIVE_MARKERS, PASSTHROUGH, Format, find_format
from ._state_spec import STEP, StateSpec

__all__ = ["STEP", "StateSpec", "check_family", "like", "prepare"]

#: The optimizer the functions below check against: a :class:`hf_optim._base.BaseOptimizer` (not imported here:
#: ``_base`` imports this module, and imports point one way).
BaseOptimizer = Any


def like(p: torch.Tensor, optional: bool = False, required: bool = False) -> StateSpec:
    return StateSpec(tuple(local(p).shape), like_param=True, optional=optional, required=required)


def prepare(opt: BaseOptimizer, state_dict: Any) -> dict[str, Any]:
    """The checked (and, for foreign formats, translated) copy of ``state_dict``; ``ValueError`` on any mismatch."""
    saved_groups, saved_state = _structure(opt, state_dict)
    groups: list[dict[str, Any]] = []
    formats: list[Format | None] = []
    for index, (saved, live) in enumerate(zip(saved_groups, opt.param_groups)):
        group, fmt = _translate_group(opt, index, saved, live)
        groups.append(_checked_knobs(opt, index, group))
        formats.append(fmt)
    state: dict[Any, Any] = {}
    for gi, (group, live, fmt) in enumerate(zip(groups, opt.param_groups, formats)):
        for pi, (pid, p) in enumerate(zip(group["params"], live["params"])):
            if pid not in saved_state:
                continue
            entry = saved_state[pid]
            if not isinstance(entry, Mapping):  # a malformed state dict: ValueError like every other mismatch
                raise ValueError(
                    f"state_dict['state'][{pid!r}] must be a dict of state values, got {type(entry).__name__}."
                )
            entry = fmt.state(dict(entry)) if fmt is not None else dict(entry)
            _check_entry(opt, gi, pi, p, group, entry, saved_groups, saved_state)
            state[pid] = entry
    return {**state_dict, "state": state, "param_groups": groups}


def check_family(opt: BaseOptimizer, state_dict: Any) -> None:
    """``ValueError`` unless every saved group is one ``opt``'s class can continue (its own or a foreign format it
    reads): the check :func:`prepare` starts with, for a stand-in optimizer whose parameters are not the saved ones
    (``hf-optim train --resume`` asks it before the model is built)."""
    if not isinstance(state_dict, Mapping) or not isinstance(state_dict.get("param_groups"), (list, tuple)):
        _structure(opt, state_dict)  # raises the structural message
    for index, saved in enumerate(state_dict["param_groups"]):
        if not isinstance(saved, Mapping):
            raise ValueError(f"{type(opt).__name__}.load_state_dict: param_groups[{index}] must be a dict.")
        _translate_group(opt, index, saved, opt._group_template(saved))


def _structure(opt: BaseOptimizer, state_dict: Any) -> tuple[list[Mapping[str, Any]], Mapping[Any, Any]]:
    name = type(opt).__name__
    if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= set(state_dict):
        raise ValueError(
            f"{name}.load_state_dict expects a dict with keys 'state' and 'param_groups' (what "
            f"Optimizer.state_dict() returns), got {type(state_dict).__name__}"
            f"{' with keys ' + str(sorted(map(str, state_dict))) if isinstance(state_dict, Mapping) else ''}."
        )
    groups, state = state_dict["param_groups"], state_dict["state"]
    if (
        not isinstance(state, Mapping)
        or not isinstance(groups, (list, tuple))
        or not all(isinstance(g, Mapping) and isinstance(g.get("params"), (list, tuple)) for g in groups)
    ):
        raise ValueError(
            f"{name}.load_state_dict: 'state' must be a dict and 'param_groups' a list of dicts with a "
            "'params' list of parameter ids."
        )
    if len(groups) != len(opt.param_groups):
        raise ValueError(
            f"{name}.load_state_dict: the state dict has {len(groups)} parameter group(s), this "
            f"optimizer {len(opt.param_groups)}. Build the optimizer with the same groups it was saved "
            "with (the Trainer: the same decay/no-decay split)."
        )
    seen: set[Any] = set()
    for index, (saved, live) in enumerate(zip(groups, opt.param_groups)):
        if len(saved["params"]) != len(live["params"]):
            raise ValueError(
                f"{name}.load_state_dict: param_groups[{index}] holds {len(saved['params'])} "
                f"parameter(s) in the state dict and {len(live['params'])} in this optimizer: the state "
                "dict belongs to another model or to groups in another order."
            )
        for pid in saved["params"]:
            try:
                duplicate = pid in seen
                seen.add(pid)
            except TypeError:
                raise ValueError(f"{name}.load_state_dict: parameter ids must be hashable, got {pid!r}.") from None
            if duplicate:
                raise ValueError(f"{name}.load_state_dict: parameter id {pid!r} appears twice in param_groups.")
    return list(groups), state


def _translate_group(
    opt: BaseOptimizer, index: int, saved: Mapping[str, Any], live: Mapping[str, Any]
) -> tuple[dict[str, Any], Format | None]:
    """hf-optim knobs for a saved group: its own values, the live optimizer's where it lacks them."""
    name, keys = type(opt).__name__, set(saved)
    knobs = {k: v for k, v in live.items() if k != "params"}
    own = set(opt.defaults) | set(knobs)
    if keys & NATIVE_MARKERS:
        alien = (keys & _known_knobs()) - own - PASSTHROUGH
        if alien:
            raise _wrong_family(opt, index, keys, f"its knobs {sorted(alien)} are not knobs of {name}")
        return {**knobs, **saved}, None
    fmt = find_format(keys, type(opt).interop_formats)
    if fmt is None:
        raise _wrong_family(opt, index, keys, "it is not one of the formats this class reads")
    passthrough = {k: saved[k] for k in PASSTHROUGH if k in saved}
    return {**knobs, **fmt.group(saved, live), **passthrough}, fmt


def _known_knobs() -> set[str]:
    """Knob names of every hf-optim class and every foreign format: a saved group holding one that the loading
    class lacks was written by another optimizer family."""
    from .registry import list_optimizers

    names = {"betas", "eps", "amsgrad", "momentum_decay", "beta2_decay", "d", "decay_rate", "clip_threshold"}
    for spec in list_optimizers():
        try:
            cls = spec.resolve()
        except (ImportError, AttributeError):  # a third-party spec whose module does not import here
            continue
        names |= set(getattr(cls, "knob_names", lambda: ())())
    for fmt in FORMATS.values():
        names |= fmt.required
    return names


def _wrong_family(opt: BaseOptimizer, index: int, keys: set[str], why: str) -> ValueError:
    name = type(opt).__name__
    guess = find_format(keys)
    looks = f" It looks like a state dict of {guess.source}." if guess is not None else ""
    accepted = ", ".join([f"hf_optim.{name}", *type(opt).interop_formats])
    return ValueError(
        f"{name}.load_state_dict: param_groups[{index}] was not saved by a compatible optimizer: {why} (group keys: "
        f"{sorted(k for k in keys if k != 'params')}).{looks} {name} loads state dicts of: {accepted}. Moments of "
        "another optimizer family cannot be continued; start this optimizer from fresh state (load only the model)."
    )


def _checked_knobs(opt: BaseOptimizer, index: int, group: dict[str, Any]) -> dict[str, Any]:
    """The class's own group validation on the loaded knobs (they would otherwise be trusted at the next step)."""
    trial = dict(group)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # magnitude warnings fired once at construction already
            opt._check_group(trial)
            opt._check_group_params(trial, list(opt.param_groups[index]["params"]))
    except (ValueError, TypeError) as err:
        raise type(err)(f"{type(opt).__name__}.load_state_dict: param_groups[{index}]: {err}") from err
    return trial


def _check_entry(
    opt: BaseOptimizer,
    gi: int,
    pi: int,
    p: torch.Tensor,
    group: dict[str, Any],
    entry: dict[str, Any],
    saved_groups: list[Mapping[str, Any]],
    saved_state: Mapping[Any, Any],
) -> None:
    name = type(opt).__name__
    where = f"{name}.load_state_dict: param_groups[{gi}] parameter {pi}"
    specs = opt._stored_state_specs(p, group)
    missing = sorted(k for k, s in specs.items() if s.required and k not in entry)
    if entry and missing:
        raise ValueError(
            f"{where}: the state lacks {missing} (a {name} state holds "
            f"{sorted(k for k, s in specs.items() if s.required)})."
        )
    for key, value in entry.items():
        spec = specs.get(key)
        if spec is None:
            raise ValueError(
                f"{where}: state key {key!r} is not kept by {name} for this parameter (expected a subset "
                f"of {sorted(specs)}, shape {tuple(local(p).shape)}). {_cause(gi, saved_groups, saved_state, opt)}"
            )
        if spec.shape is None:
            _check_step(where, value)
            continue
        if value is None and spec.optional:
            continue
        if not torch.is_tensor(value):
            raise ValueError(f"{where}: state[{key!r}] must be a tensor, got {type(value).__name__}.")
        shape = tuple(local(value).shape)
        if shape != spec.shape:
            raise ValueError(
                f"{where}: state[{key!r}] has shape {shape}, expected {spec.shape} for the parameter of shape "
                f"{tuple(local(p).shape)}. {_cause(gi, saved_groups, saved_state, opt)}"
            )
        if spec.dtype is not None:
            if value.dtype != spec.dtype:
                raise ValueError(
                    f"{where}: state[{key!r}] has dtype {value.dtype}, expected {spec.dtype} (state_dtype="
                    f"{group.get('state_dtype')!r}: see hf_optim.precision for the stored layout)."
                )
            continue
        wanted_complex = spec.like_param and p.is_complex()
        if value.is_complex() != wanted_complex or not (value.is_floating_point() or value.is_complex()):
            kind = "complex" if wanted_complex else "real floating-point"
            raise ValueError(
                f"{where}: state[{key!r}] has dtype {value.dtype}, expected a {kind} dtype for the "
                f"parameter of dtype {p.dtype}."
            )


def _check_step(where: str, value: Any) -> None:
    if torch.is_tensor(value):
        ok = value.numel() == 1 and not value.is_complex() and value.dtype != torch.bool
        number = value.item() if ok else None
    else:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        number = value if ok else None
    if not ok or not (number is not None and 0 <= float(number) < float("inf")):
        raise ValueError(
            f"{where}: state['step'] must be a finite number >= 0 (or a 1-element tensor of one), got {value!r}."
        )


def _signature(entry: Any) -> tuple[int, ...] | None:
    """The parameter shape a saved entry implies: the shape of its largest tensor."""
    if not isinstance(entry, Mapping):
        return None
    tensors = [v for v in entry.values() if torch.is_tensor(v) and v.dim() > 0]
    if not tensors:
        return None
    return tuple(max(tensors, key=lambda t: (t.dim(), t.numel())).shape)


def _cause(gi: int, saved_groups: list[Mapping[str, Any]], saved_state: Mapping[Any, Any], opt: BaseOptimizer) -> str:
    saved = [_signature(saved_state.get(pid)) for pid in saved_groups[gi]["params"]]
    for j, live in enumerate(opt.param_groups):
        shapes = [tuple(local(p).shape) for p in live["params"]]
        if (
            j != gi
            and len(shapes) == len(saved)
            and all(s is None or s == t for s, t in zip(saved, shapes))
            and any(s is not None for s in saved)
        ):
            return (
                f"Likely cause: the parameter groups are in another order (saved group {gi} fits this "
                f"optimizer's group {j}); build the optimizer with the groups in the order they were saved."
            )
    return (
        "Likely cause: the state dict was saved for another model (another size or architecture) or for "
        "parameter groups in another order; load it into the optimizer of the model it was saved with."
    )
