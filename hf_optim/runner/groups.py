"""``hf-optim groups``: the parameter groups an optimizer gets from a recipe or a model config, as a table.

Each row is a parameter-name pattern (layer numbers folded into ranges, ``model.layers.[0-3].mlp.up_proj.weight``)
with the learning rate, weight decay and decay mode every tensor of the row has, and how many tensors and elements
it covers. The optimizer is built by the same code as training (``hf-optim train``'s recipe path or
:func:`hf_optim.create_optimizer`), on a model whose tensors live on the ``meta`` device, so a 70B config costs no
memory. muP multipliers, the decay / no-decay split, ``groups`` rules and ``layer_decay`` are all in the table.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: A layer number between dots in a parameter name (``layers.3.``, ``h.0.``, ``experts.12.``).
_NUMBER = re.compile(r"(?<=\.)\d+(?=\.)")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    from . import schema

    parser = argparse.ArgumentParser(
        prog="hf-optim groups",
        description="Print the parameter groups a recipe (its model and optimizer) or a Hugging Face model config "
        "(config.json, or a directory holding one, with --optim/--lr/...) gets: pattern -> lr, decay, mode, count.",
    )
    parser.add_argument(
        "source",
        help=f"a recipe file or bundled name ({', '.join(schema.bundled_names())}), or a config.json / model directory",
    )
    parser.add_argument("overrides", nargs="*", help="recipe overrides section.key=value, as for hf-optim train")
    parser.add_argument("--size", help="the recipe's model size whose settings apply (default: the recipe's run.size)")
    parser.add_argument("--optim", default=None, help="model config only: optimizer name (default adamw_v2)")
    parser.add_argument("--lr", type=float, default=None, help="model config only: learning rate (default 1e-3)")
    parser.add_argument("--weight-decay", type=float, default=None, help="model config only: weight decay (default 0)")
    parser.add_argument("--optim-args", default=None, help="model config only: the --optim_args string of the Trainer")
    parser.add_argument("--groups", default=None, help="a YAML file of parameter-group rules (see docs/groups.md)")
    parser.add_argument("--layer-decay", type=float, default=None, help="layer-wise lr decay d: lr x d^(L-i)")
    parser.add_argument("--names", action="store_true", help="one row per parameter instead of folded patterns")
    args = parser.parse_intermixed_args(argv)
    if is_model_config(args.source):
        if args.overrides or args.size:
            parser.error("recipe overrides and --size apply to a recipe, not to a model config")
    else:
        given = [f"--{k.replace('_', '-')}" for k in ("optim", "lr", "weight_decay", "optim_args") if getattr(args, k)]
        if given:
            parser.error(
                f"{', '.join(given)} apply to a model config; for a recipe write overrides instead "
                "(optimizer.name=..., optimizer.lr=..., optimizer.weight_decay=...)"
            )
    return args


def is_model_config(source: str) -> bool:
    path = Path(source).expanduser()
    return path.suffix == ".json" or (path.is_dir() and (path / "config.json").is_file())


def _recipe_model_and_optimizer(args: argparse.Namespace) -> tuple[nn.Module, torch.optim.Optimizer, str]:
    from hf_optim.param_rules import read_rules_file

    from . import _train_model, build, data, schema
    from .train import DATA_DEFAULTS, RUN_DEFAULTS, _section

    recipe = schema.load(args.source, args.overrides)
    optimizer_section = recipe.setdefault("optimizer", {})
    if args.groups is not None:
        optimizer_section["groups"] = read_rules_file(args.groups, "--groups")
    if args.layer_decay is not None:
        optimizer_section["layer_decay"] = args.layer_decay
    size = args.size or _section(recipe, "run", RUN_DEFAULTS).get("size")
    build.dry_build(recipe, size=size)  # every optimizer value checked before the model is built
    data_cfg = _section(recipe, "data", DATA_DEFAULTS)
    vocab = 256 if data_cfg["tokenizer"] == "byte" else data.tokenize(data.read_text(data_cfg["corpus"]), "char")[1]
    with torch.device("meta"):
        model = _train_model.build_model(
            _section(recipe, "model", _train_model.MODEL_DEFAULTS), vocab, data_cfg["block_size"]
        )
    name = (recipe.get("optimizer") or {}).get("name", "adamw_v2")
    return model, build.build_optimizer(recipe, model, size=size), f"recipe {recipe['name']!r}, optimizer {name}"


def _config_model_and_optimizer(args: argparse.Namespace) -> tuple[nn.Module, torch.optim.Optimizer, str]:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from hf_optim.factory import create_optimizer

    path = Path(args.source).expanduser()
    if not path.exists():
        raise ValueError(f"model config {str(path)!r} does not exist.")
    config = AutoConfig.from_pretrained(str(path))  # a local file or directory: never downloads
    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(config)
        except ValueError:  # not a causal LM (an encoder, a ViT): its base model
            model = AutoModel.from_config(config)
    name = args.optim or "adamw_v2"
    optimizer = create_optimizer(
        name,
        model,
        lr=1e-3 if args.lr is None else args.lr,
        weight_decay=args.weight_decay or 0.0,
        optim_args=args.optim_args,
        groups=args.groups,
        layer_decay=args.layer_decay,
    )
    return model, optimizer, f"{type(model).__name__} from {path}, optimizer {name}"


def model_and_optimizer(args: argparse.Namespace) -> tuple[nn.Module, torch.optim.Optimizer, str]:
    """The (meta-device) model, its optimizer as training builds it, and a line saying what they are."""
    import warnings

    build = _config_model_and_optimizer if is_model_config(args.source) else _recipe_model_and_optimizer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # magnitude advice belongs to training, not to this table
        return build(args)


def _ranges(numbers: set[int]) -> str:
    """``{0, 1, 2, 5}`` -> ``0-2,5``."""
    ordered, spans = sorted(numbers), []
    start = prev = ordered[0]
    for n in [*ordered[1:], None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        spans.append(str(start) if start == prev else f"{start}-{prev}")
        if n is not None:
            start = prev = n
    return ",".join(spans)


def _fold(names: list[str]) -> str:
    """Names that differ only in their layer numbers, as one pattern with the numbers as ranges."""
    template = _NUMBER.sub("{}", names[0])
    columns = list(zip(*(_NUMBER.findall(n) for n in names), strict=True))
    if not columns:
        return names[0]
    parts = [(str(min(c)) if len(set(c)) == 1 else "[" + _ranges({int(x) for x in c}) + "]") for c in columns]
    return template.format(*parts)


def group_table(model: nn.Module, optimizer: torch.optim.Optimizer, *, fold: bool = True) -> list[dict[str, Any]]:
    """Rows ``{pattern, lr, weight_decay, mode, rule, tensors, elements}`` in the model's parameter order.

    A parameter the optimizer does not hold (frozen by a rule, or ``requires_grad=False``) has ``lr=None``.
    """
    settings: dict[int, tuple[Any, ...]] = {}
    default_mode = optimizer.defaults.get("weight_decay_mode")
    for group in optimizer.param_groups:
        values = (
            group["lr"],
            group.get("weight_decay", 0.0),
            group.get("weight_decay_mode", default_mode),
            group.get("rule"),  # the update rule of a multi-rule optimizer (Muon: muon / fallback)
        )
        for p in group["params"]:
            settings[id(p)] = values
    rows: dict[tuple[Any, ...], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        values = settings.get(id(p), (None, None, None, None))
        key = (_NUMBER.sub("{}", name) if fold else name, *values)
        row = rows.setdefault(key, {"names": [], "elements": 0, "values": values})
        row["names"].append(name)
        row["elements"] += p.numel()
    return [
        {
            "pattern": _fold(row["names"]),
            "lr": row["values"][0],
            "weight_decay": row["values"][1],
            "mode": row["values"][2],
            "rule": row["values"][3],
            "tensors": len(row["names"]),
            "elements": row["elements"],
        }
        for row in rows.values()
    ]


def render(rows: list[dict[str, Any]], base_lr: float) -> str:
    def lr_text(lr: float | None) -> str:
        if lr is None:
            return "frozen"
        return f"{lr:.3g} (x{lr / base_lr:.4g})" if base_lr else f"{lr:.3g}"

    with_rule = any(r["rule"] for r in rows)
    header = ("parameters", *(("update",) if with_rule else ()), "lr (x base)", "weight_decay", "mode")
    table = [
        (
            r["pattern"],
            *((r["rule"] or "-",) if with_rule else ()),
            lr_text(r["lr"]),
            "-" if r["weight_decay"] is None else f"{r['weight_decay']:.3g}",
            r["mode"] or "-",
            str(r["tensors"]),
            f"{r['elements']:,}",
        )
        for r in rows
    ]
    header = (*header, "tensors", "elements")
    widths = [max(len(line[i]) for line in [header, *table]) for i in range(len(header))]
    numeric = len(header) - 2  # the two count columns are right-aligned
    lines = [
        "  ".join(c.ljust(w) if i < numeric else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True)))
        for line in [header, *table]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    model, optimizer, what = model_and_optimizer(args)
    rows = group_table(model, optimizer, fold=not args.names)
    base_lr = optimizer.defaults.get("lr") or 0.0
    tensors = sum(r["tensors"] for r in rows)
    frozen = sum(r["tensors"] for r in rows if r["lr"] is None)
    print(f"{what}: base lr {base_lr:.3g}, {len(optimizer.param_groups)} groups, {tensors} tensors ({frozen} frozen)")
    print("groups rules: the first rule whose regex matches a name decides its values; muP multipliers come first.\n")
    print(render(rows, base_lr))
    return 0
