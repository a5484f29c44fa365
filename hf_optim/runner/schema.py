"""Load and validate recipe YAML files.

A recipe is a nested mapping whose allowed keys are :data:`~hf_optim.runner._recipe_fields.SCHEMA`; anything else is
an error that names the key and the closest valid one. YAML is read with ``yaml.safe_load`` only. Two kinds:

- ``published``: the optimizer settings of a paper. It must cite ``sources`` and every field of
  :data:`~hf_optim.runner._recipe_fields.PUBLISHED_FIELDS` must either have a value or be listed in ``unknown``
  (fields the source does not state). A field listed in ``unknown`` may still carry a value only if ``assumptions``
  says why (e.g. GPT-3's "weight decay 0.1" read as PyTorch-AdamW's lr-coupled form): nothing is filled in silently.
- ``demo``: a runnable recipe; ``base: llm/llama2`` inherits a published recipe (deep merge, the demo wins), then
  ``model``/``data``/``run`` say what to train.

Recipes are referred to by path or by bundled name (``demo``, ``llm/palm``, ``palm``); see :func:`resolve_path`.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from hf_optim._validation import closest

from ._recipe_fields import (
    ADAM_FIELDS,
    FLOAT_OR_LR_PEAK,
    PUBLISHED_FIELDS,
    SCHEMA,
    SIZE_KEYS,
    WEIGHT_DECAY_IS_LR_PEAK,
    field_paths,
)
from .bundled import recipes_dir

RECIPES_DIR = recipes_dir()
ALIASES = {"demo": "demo/shakespeare_mup_llama_adafactor"}


def _takes_betas(name: Any) -> bool:
    from hf_optim.registry import get_spec

    try:
        return get_spec(name).takes_betas
    except ValueError:  # an unknown name is reported by the optimizer check
        return False


class RecipeError(ValueError):
    """A recipe that does not match the schema (unknown key, wrong type, missing source or unknown-field entry)."""


def _type_ok(value: Any, expected: Any) -> bool:
    if value is None:
        return True  # null = not stated; the published-field rule below decides whether that is allowed
    if isinstance(expected, tuple):
        return value in expected
    if expected == FLOAT_OR_LR_PEAK:
        return value == WEIGHT_DECAY_IS_LR_PEAK or _type_ok(value, float)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def _describe(expected: Any) -> str:
    if expected == FLOAT_OR_LR_PEAK:
        return f"a number or {WEIGHT_DECAY_IS_LR_PEAK!r} (lambda = the peak lr)"
    return f"one of {list(expected)}" if isinstance(expected, tuple) else f"a {getattr(expected, '__name__', expected)}"


def _check_keys(where: str, data: Any, schema: Mapping[str, Any], origin: str) -> None:
    if not isinstance(data, Mapping):
        raise RecipeError(f"{origin}: {where or 'the recipe'} must be a mapping, got {type(data).__name__}.")
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if not where and key == "_path":
            continue  # bookkeeping added by load() (e.g. _path)
        if key not in schema:
            raise RecipeError(
                f"{origin}: unknown key {path!r}.{closest(str(key), schema)} "
                f"Valid keys{' of ' + repr(where) if where else ''}: {sorted(schema)}."
            )
        expected = schema[key]
        if expected == "any":
            if value is not None and not isinstance(value, Mapping):
                raise RecipeError(f"{origin}: {path} must be a mapping, got {value!r}.")
        elif expected == "sizes":
            if not isinstance(value, Mapping):
                raise RecipeError(f"{origin}: sizes must map a size label (e.g. '7B') to its settings, got {value!r}.")
            for label, entry in value.items():
                _check_keys(f"sizes.{label}", entry, SIZE_KEYS, origin)
        elif isinstance(expected, dict):
            _check_keys(path, value, expected, origin)
        elif not _type_ok(value, expected):
            raise RecipeError(f"{origin}: {path} must be {_describe(expected)}, got {value!r}.")


def _get(recipe: Mapping[str, Any], path: str) -> Any:
    node: Any = recipe
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _stated(recipe: Mapping[str, Any], path: str) -> bool:
    sizes = recipe.get("sizes") or {}
    if path == "schedule.warmup_steps":
        sched = recipe.get("schedule") or {}
        if any(sched.get(k) is not None for k in ("warmup_steps", "warmup_tokens", "warmup_fraction")):
            return True
        return bool(sizes) and all(s.get("warmup_steps") is not None for s in sizes.values())
    if path in ("optimizer.lr", "training.batch_tokens") and _get(recipe, path) is None:
        key = path.split(".")[1]
        return bool(sizes) and all(s.get(key) is not None for s in sizes.values())
    return _get(recipe, path) is not None


def _check_values(recipe: Mapping[str, Any], origin: str) -> None:
    """Ranges and cross-field rules that a per-key type check cannot express."""
    sizes = recipe.get("sizes") or {}
    size = _get(recipe, "run.size")
    if size is not None and size not in sizes:
        allowed = f"one of {list(sizes)}" if sizes else "unset (this recipe has no sizes table)"
        raise RecipeError(
            f"{origin}: run.size={size!r} is not a size of this recipe; allowed: {allowed}."
            f"{closest(str(size), [str(label) for label in sizes])}"
        )
    fraction = _get(recipe, "schedule.warmup_fraction")
    # A fraction >= 1 would leave no step after the warm-up: the schedule would never reach its peak.
    if fraction is not None and not 0.0 <= fraction < 1.0:
        raise RecipeError(
            f"{origin}: schedule.warmup_fraction must be in [0, 1) (a fraction of the run's steps), got {fraction!r}."
        )
    if _get(recipe, "optimizer.weight_decay") == WEIGHT_DECAY_IS_LR_PEAK and not _stated(recipe, "optimizer.lr"):
        raise RecipeError(
            f"{origin}: optimizer.weight_decay={WEIGHT_DECAY_IS_LR_PEAK!r} means lambda = the peak lr, "
            "but the recipe states no optimizer.lr (nor an lr for every size)."
        )


def validate(recipe: Mapping[str, Any], origin: str = "recipe") -> None:
    """Raise :class:`RecipeError` unless ``recipe`` (already merged with its base) follows the schema."""
    _check_keys("", recipe, SCHEMA, origin)
    valid_paths = field_paths()
    for listed in ("unknown", "assumptions"):
        for path in recipe.get(listed) or []:
            if path not in valid_paths and not path.startswith("optimizer.args."):
                raise RecipeError(
                    f"{origin}: {listed} entry {path!r} is not a recipe field.{closest(path, valid_paths)}"
                )
    no_decay = _get(recipe, "optimizer.no_decay") or []
    for item in no_decay:
        from hf_optim.factory import NO_DECAY_PATTERNS as NO_DECAY_CATEGORIES

        if item not in NO_DECAY_CATEGORIES:
            raise RecipeError(
                f"{origin}: optimizer.no_decay entries must be among {list(NO_DECAY_CATEGORIES)}, "
                f"got {item!r}.{closest(str(item), NO_DECAY_CATEGORIES)}"
            )
    betas = _get(recipe, "optimizer.betas")
    if betas is not None and (len(betas) != 2 or not all(_type_ok(b, float) for b in betas)):
        raise RecipeError(f"{origin}: optimizer.betas must be a pair of numbers, got {betas!r}.")
    _check_values(recipe, origin)
    kind = recipe.get("kind")
    if kind is None:
        raise RecipeError(f"{origin}: 'kind' is required (one of ['published', 'demo']).")
    if recipe.get("name") is None:
        raise RecipeError(f"{origin}: 'name' is required.")
    if kind != "published":
        return
    if not recipe.get("sources"):
        raise RecipeError(f"{origin}: a published recipe needs 'sources' (paper section/table or config path).")
    if "unknown" not in recipe:
        raise RecipeError(f"{origin}: a published recipe needs an explicit 'unknown' list (may be empty: []).")
    unknown = set(recipe.get("unknown") or [])
    assumptions = recipe.get("assumptions") or {}
    fields = PUBLISHED_FIELDS + (ADAM_FIELDS if _takes_betas(_get(recipe, "optimizer.name")) else ())
    for path in fields:
        if not _stated(recipe, path) and path not in unknown:
            raise RecipeError(
                f"{origin}: {path} has no value; state it or list it under 'unknown' if the source does not give it."
            )
    for path in unknown:
        if _get(recipe, path) is not None and path not in assumptions:
            raise RecipeError(
                f"{origin}: {path} is listed as unknown but has a value; add assumptions.{path} "
                "saying why this value was chosen, or remove the value."
            )


def resolve_path(ref: str | Path) -> Path:
    """A file path, or a bundled name: ``demo``, ``llm/llama2``, ``llama2`` (searched in llm/ then demo/)."""
    path = Path(ref).expanduser()
    if path.is_file():
        return path
    name = ALIASES.get(str(ref), str(ref)).removesuffix(".yaml")
    candidates = [
        RECIPES_DIR / f"{name}.yaml",
        RECIPES_DIR / "llm" / f"{name}.yaml",
        RECIPES_DIR / "demo" / f"{name}.yaml",
    ]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    known = bundled_names()
    raise RecipeError(
        f"recipe {str(ref)!r} is neither a file nor a bundled recipe.{closest(str(ref), known)} Bundled: {known}."
    )


def describe_bundled() -> list[tuple[str, str, str]]:
    """``(kind, name, title)`` of every bundled recipe (``train``) and sweep config (``sweep``), for ``hf-optim list
    --recipes``."""
    rows = []
    for sub, kind in (("demo", "train"), ("llm", "train"), ("sweeps", "sweep")):
        for path in sorted((RECIPES_DIR / sub).glob("*.yaml")):
            data = _read_yaml(path)
            name = path.stem if kind == "sweep" else f"{sub}/{path.stem}"
            title = str(data.get("title") or "").strip() or _first_comment(path)
            rows.append((kind, name, title))
    return rows


def _first_comment(path: Path) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def bundled_names() -> list[str]:
    names = [f"{p.parent.name}/{p.stem}" for sub in ("llm", "demo") for p in sorted((RECIPES_DIR / sub).glob("*.yaml"))]
    return [*ALIASES, *names]


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping) and key not in ("assumptions",):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optimizer.lr=3e-3"`` → (["optimizer", "lr"], 0.003); values are parsed as YAML (safely)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise RecipeError(f"override {text!r} must look like section.key=value (e.g. run.max_steps=50).")
    value = yaml.safe_load(raw) if raw.strip() else None
    # YAML 1.1 reads "3e-3" as a string (it wants "3.0e-3"); accept the form people type.
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value)
    return key.split("."), value


#: A recipe-wide field and its per-size counterpart (``sizes.<label>.<key>`` wins over the section's value).
SIZED_FIELDS = {
    "optimizer.lr": "lr",
    "training.batch_tokens": "batch_tokens",
    "training.total_tokens": "total_tokens",
    "training.seq_len": "seq_len",
    "schedule.warmup_steps": "warmup_steps",
    "schedule.decay_steps": "decay_steps",
    "schedule.floor": "floor",
}


def _override_sizes(recipe: dict[str, Any], dotted: str) -> None:
    """An explicit value (command line, or a demo over its ``base``) beats the base's per-size values."""
    key = SIZED_FIELDS.get(dotted)
    for entry in (recipe.get("sizes") or {}).values():
        if key is not None and isinstance(entry, dict):
            entry.pop(key, None)


def _override_target(recipe: Mapping[str, Any], text: str, parts: list[str], valid: list[str]) -> list[str]:
    """The key path an override writes to; refuses keys that do not exist instead of silently adding them.

    ``sizes.<label>.<key>`` needs an existing size label (``sizes.7X.lr=...`` would otherwise add a size nobody
    selects) and a per-size key; ``assumptions.<field path>`` is one entry whose key is the dotted path itself.
    """
    dotted = ".".join(parts)
    if parts[0] == "sizes" and len(parts) > 1:
        sizes = recipe.get("sizes") or {}
        # A label may contain dots ("1.3B"): match the longest known label first.
        labels = sorted((str(label) for label in sizes), key=len, reverse=True)
        rest = dotted[len("sizes.") :]
        label = next((lab for lab in labels if rest == lab or rest.startswith(lab + ".")), None)
        if label is None:
            guess = rest.split(".")[0]
            allowed = list(sizes) if sizes else "none (this recipe has no sizes table)"
            raise RecipeError(
                f"override {text!r}: unknown size {guess!r}; sizes of this recipe: {allowed}.{closest(guess, labels)}"
            )
        key = rest[len(label) + 1 :]
        if key and key not in SIZE_KEYS:
            raise RecipeError(
                f"override {text!r}: unknown per-size key {key!r}; allowed: {sorted(SIZE_KEYS)}."
                f"{closest(key, SIZE_KEYS)}"
            )
        return ["sizes", label, key] if key else ["sizes", label]
    if parts[0] == "assumptions" and len(parts) > 1:
        field = dotted[len("assumptions.") :]
        if field not in valid and not field.startswith("optimizer.args."):
            raise RecipeError(
                f"override {text!r}: assumptions entry {field!r} is not a recipe field.{closest(field, valid)}"
            )
        return ["assumptions", field]
    if dotted not in valid and not dotted.startswith("optimizer.args."):
        raise RecipeError(f"override {text!r}: unknown key {dotted!r}.{closest(dotted, valid)}")
    return parts


def apply_overrides(recipe: Mapping[str, Any], overrides: list[str]) -> dict[str, Any]:
    result = copy.deepcopy(dict(recipe))
    valid = field_paths()
    for text in overrides:
        parts, value = parse_override(text)
        target = _override_target(result, text, parts, valid)
        node = result
        for part in target[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[target[-1]] = value
        _override_sizes(result, ".".join(parts))
    return result


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        with path.open(encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except yaml.YAMLError as error:
        raise RecipeError(f"{path}: {yaml_error_text(error)}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise RecipeError(f"{path}: cannot be read as a UTF-8 text file ({error}).") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping, got {type(data).__name__}.")
    return data


def yaml_error_text(error: yaml.YAMLError) -> str:
    """A YAML error (syntax, or a tag safe_load refuses) in one line: where (line and column, 1-based) and what the parser expected."""
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "somewhere"
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    context = getattr(error, "context", None)
    return f"YAML error at {where}: {problem}{' (' + context + ')' if context else ''}."


def load(ref: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Read a recipe (path or bundled name), merge its ``base`` chain, apply overrides, validate, return it."""
    path = resolve_path(ref)
    raw = _read_yaml(path)
    _check_keys("", raw, SCHEMA, str(path))  # report unknown keys against the file that has them
    seen = {path}
    recipe = raw
    while recipe.get("base"):
        base_path = resolve_path(recipe["base"])
        if base_path in seen:
            raise RecipeError(f"{path}: circular 'base' chain through {base_path}.")
        seen.add(base_path)
        base = _read_yaml(base_path)
        _check_keys("", base, SCHEMA, str(base_path))
        child = {k: v for k, v in recipe.items() if k != "base"}
        merged = deep_merge(base, child)
        for dotted in SIZED_FIELDS:
            if _get(child, dotted) is not None:
                _override_sizes(merged, dotted)
        recipe = merged
        recipe["base"] = base.get("base")
    recipe.pop("base", None)
    recipe = apply_overrides(recipe, overrides or [])
    validate(recipe, str(path))
    recipe["_path"] = str(path)
    return recipe
