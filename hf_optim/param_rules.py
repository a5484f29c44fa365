r"""Parameter-group rules: per-parameter lr multipliers, weight decay, decay mode and freezing, chosen by regex on
parameter names, plus layer-wise lr decay; turned into ``param_overrides`` by the factory (every entry point).

A rule is a mapping::

    {match: REGEX, lr_mult: 0.5, weight_decay: 0.0, weight_decay_mode: independent, freeze: false}

``match`` is searched (``re.search``) in each parameter's full name (``model.layers.3.mlp.up_proj.weight``).
**The first rule that matches a parameter wins** (as in a ``.gitignore`` read top-down, or fairseq2's ordered
groups); later rules never see it. A rule that matches no parameter, or only parameters taken by earlier rules, is
an error naming the closest parameter names, so a typo cannot silently do nothing.

What a rule's values mean, composed with the rest:

* ``lr_mult`` multiplies the parameter's lr **after** muP: lr = lr_peak x muP multiplier x ``lr_mult`` x layer
  decay; the three are independent factors.
* ``weight_decay`` replaces λ for the matched parameters, the default decay / no-decay split included (a rule may
  decay a bias); muP's weight-decay multiplier (``mup_wd_rule=mup``) then scales the user's λ as it scales the
  group's, so the user states a base-width λ.
* ``weight_decay_mode`` replaces the mode (and wins over the mode ``mup_wd_rule=independent`` would set).
* ``freeze: true``: ``requires_grad=False`` on the model and no place in the optimizer, so the parameter has no
  state; a frozen rule takes no other value.

``layer_decay`` (``d`` in (0, 1]) gives numbered transformer blocks geometrically smaller lrs, as in BEiT/ELECTRA
(timm's ``layer_decay``): with ``B`` blocks, ``L = B + 1`` and layer id ``i`` = 0 for embeddings, ``k + 1`` for
block ``k``, ``L`` for everything after the blocks (final norm, head), the lr multiplier is :math:`d^{L-i}`.
Blocks are found by name: ``layers.K.`` (LLaMA), ``h.K.`` (GPT-2), ``layer.K.`` (BERT/ViT), ``blocks.K.`` (timm).
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._validation import check_choice, closest
from .decay import WEIGHT_DECAY_MODES

#: What a rule may set besides ``match`` / ``freeze``; ``optimizer`` picks the update rule of a multi-rule optimizer.
VALUE_KEYS = ("lr_mult", "weight_decay", "weight_decay_mode", "optimizer")
RULE_KEYS = ("match", *VALUE_KEYS, "freeze")
#: Values of a rule's ``optimizer``: Muon's hidden-matrix rule or its fallback (hf_optim.optim.muon.optimizer).
UPDATE_RULES = ("muon", "fallback")
BLOCK_INDEX = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks)\.(\d+)\.")
EMBEDDING = re.compile(r"embed|(?:^|\.)wte\.|(?:^|\.)wpe\.|cls_token|pos_embed|patch_embed")


@dataclass(frozen=True)
class Rule:
    """One checked rule (see the module docstring); ``index`` is its position, for messages."""

    index: int
    match: str
    lr_mult: float | None = None
    weight_decay: float | None = None
    weight_decay_mode: str | None = None
    optimizer: str | None = None
    freeze: bool = False

    @property
    def pattern(self) -> re.Pattern[str]:
        return re.compile(self.match)


def _number(where: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{where}: {key} must be a finite number >= 0, got {value!r}.")
    return float(value)


def _rule(index: int, raw: Any, origin: str) -> Rule:
    where = f"{origin} rule {index}"
    if not isinstance(raw, Mapping):
        raise TypeError(f"{where} must be a mapping with a 'match' regex, got {raw!r}.")
    unknown = sorted(set(raw) - set(RULE_KEYS))
    if unknown:
        raise ValueError(
            f"{where}: unknown key(s) {unknown}; a rule takes {list(RULE_KEYS)}.{closest(str(unknown[0]), RULE_KEYS)}"
        )
    match = raw.get("match")
    if not isinstance(match, str) or not match:
        raise ValueError(f"{where}: 'match' must be a non-empty regex on parameter names, got {match!r}.")
    try:
        re.compile(match)
    except re.error as error:
        raise ValueError(f"{where}: match {match!r} is not a regular expression ({error}).") from None
    freeze = raw.get("freeze", False)
    if not isinstance(freeze, bool):
        raise TypeError(f"{where}: freeze must be true or false, got {freeze!r}.")
    values = {k: raw[k] for k in VALUE_KEYS if raw.get(k) is not None}
    if freeze and values:
        raise ValueError(f"{where}: a frozen rule takes no other value (got {sorted(values)}); drop them or freeze.")
    if not freeze and not values:
        raise ValueError(f"{where}: match {match!r} sets nothing; give {', '.join(VALUE_KEYS)} or freeze.")
    if "weight_decay_mode" in values:
        check_choice(f"{where}: weight_decay_mode", values["weight_decay_mode"], WEIGHT_DECAY_MODES)
    if "optimizer" in values:
        check_choice(f"{where}: optimizer", values["optimizer"], UPDATE_RULES)
    for key in ("lr_mult", "weight_decay"):
        if key in values:
            values[key] = _number(where, key, values[key])
    return Rule(index=index, match=match, freeze=freeze, **values)


def read_rules_file(value: str | Path, origin: str = "groups") -> Any:
    """The rules held by a YAML file: a list of rules, or a mapping with that list under ``groups:``."""
    import yaml

    path = Path(value).expanduser()
    if not path.is_file():
        raise ValueError(f"{origin}={str(value)!r}: no such file (a YAML list of rules, see hf_optim.param_rules).")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{origin}={str(value)!r}: not a readable YAML file ({' '.join(str(error).split())})."
        ) from None
    return data.get("groups") if isinstance(data, Mapping) else data


def parse_rules(value: Any, origin: str = "groups") -> tuple[Rule, ...]:
    """Checked rules from a list of mappings, or from the path of a YAML file holding that list (or ``groups:``)."""
    if value is None:
        return ()
    if isinstance(value, (str, Path)):
        value, origin = read_rules_file(value, origin), str(Path(value).expanduser())
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes)):
        raise TypeError(f"{origin} must be a list of rules ({{match: REGEX, lr_mult: ...}}), got {value!r}.")
    return tuple(_rule(i, raw, origin) for i, raw in enumerate(value))


def check_layer_decay(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"layer_decay must be a number in (0, 1] (lr x decay^(L - layer id)), got {value!r}.")
    return float(value)


def layer_ids(names: Sequence[str]) -> tuple[dict[str, int], int]:
    """``({name: layer id}, L)`` for layer decay (ids as in the module docstring); ``ValueError`` without blocks."""
    blocks = {n: int(m.group(1)) for n in names if (m := BLOCK_INDEX.search(n))}
    if not blocks:
        raise ValueError(
            "layer_decay needs numbered blocks (names with layers.K., h.K., layer.K. or blocks.K.), but no parameter "
            f"name has one; names: {list(names)[:6]} ..."
        )
    top = max(blocks.values()) + 2  # L = B + 1 with B blocks
    ids = {n: blocks[n] + 1 if n in blocks else (0 if EMBEDDING.search(n) else top) for n in names}
    return ids, top


def _no_match_error(rule: Rule, names: Sequence[str], taken: Mapping[str, int]) -> ValueError:
    hits = [n for n in names if rule.pattern.search(n)]
    if hits:
        earlier = sorted({taken[n] for n in hits})
        return ValueError(
            f"groups rule {rule.index} (match {rule.match!r}) matches only parameters taken by earlier rule(s) "
            f"{earlier} (the first matching rule wins); reorder the rules or narrow the earlier match."
        )
    near = difflib.get_close_matches(rule.match, names, n=3, cutoff=0.0)
    return ValueError(
        f"groups rule {rule.index} (match {rule.match!r}) matches no parameter; closest names: {near}. The regex is "
        "searched in full parameter names (model.named_parameters())."
    )


def rule_overrides(
    model: nn.Module, rules: Sequence[Rule], layer_decay: float | None = None
) -> dict[torch.Tensor, dict[str, Any]]:
    """``{param: override}`` from the rules (first match wins) and layer decay; frozen parameters get
    ``{"frozen": True}`` and ``requires_grad=False``."""
    named = list(model.named_parameters())
    names = [n for n, _ in named]
    taken: dict[str, int] = {}
    chosen: dict[str, Rule] = {}
    for rule in rules:
        for name in names:
            if name not in taken and rule.pattern.search(name):
                taken[name] = rule.index
                chosen[name] = rule
        if rule.index not in taken.values():
            raise _no_match_error(rule, names, taken)
    ids, top = layer_ids(names) if layer_decay is not None else ({}, 0)
    out: dict[torch.Tensor, dict[str, Any]] = {}
    for name, param in named:
        rule = chosen.get(name)
        if rule is not None and rule.freeze:
            param.requires_grad_(False)
            out[param] = {"frozen": True}
            continue
        override: dict[str, Any] = {}
        mult = (rule.lr_mult if rule is not None and rule.lr_mult is not None else 1.0) * (
            layer_decay ** (top - ids[name]) if layer_decay is not None else 1.0
        )
        if mult != 1.0 or (rule is not None and rule.lr_mult is not None):
            override["lr_mult"] = mult
        if rule is not None:
            override.update(
                {k: getattr(rule, k) for k in ("weight_decay", "weight_decay_mode") if getattr(rule, k) is not None}
            )
            if rule.optimizer is not None:  # which update rule of a multi-rule optimizer (Muon) steps it
                override["rule"] = rule.optimizer
        if override:
            out[param] = override
    return out


def merge(mup: Mapping[torch.Tensor, Mapping[str, Any]] | None, user: Mapping[torch.Tensor, Mapping[str, Any]]):
    """muP's overrides, then the user's: lr multipliers multiply, the user's other values replace muP's."""
    merged = {p: dict(o) for p, o in (mup or {}).items()}
    for param, override in user.items():
        if override.get("frozen"):
            merged[param] = {"frozen": True}
            continue
        entry = merged.setdefault(param, {})
        for key, value in override.items():
            entry[key] = entry.get(key, 1.0) * value if key == "lr_mult" else value
    return merged
