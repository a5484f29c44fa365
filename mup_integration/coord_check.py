r"""Coordinate check: does the size of every activation stay put as the model widens?

For each width :math:`n` and each parametrization (``sp``: the model's standard Hugging Face parametrization and
constant learning rate; ``mup``: :func:`~mup_integration.make_mup_model` + the Adam-like muP rule), train a fresh
model for a few Adam steps on the same text and record, at every step :math:`t` (before its update), the mean absolute
coordinate :math:`\frac{1}{N}\sum_i |h_i|` of each module's output (forward hooks). Under muP these curves are flat in
:math:`n`; under SP the hidden activations grow with :math:`n` (Yang et al., Tensor Programs V, Section 7).

``hf-optim coord-check --widths 64,128,256,512,1024`` writes ``coord_check.csv`` and ``coord_check.png``;
``--depths 2,4,8,16,32,64`` (at a fixed ``--width``) runs the depth check of :mod:`mup_integration.coord_check_depth`.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from hf_optim import _validation as v

from ._coord_inputs import _batches, _config, _save_figure, _sweep, _train_step, _write_csv

PARAMETRIZATIONS = ("sp", "mup")
MODELS = ("llama", "gpt2")


@dataclass(frozen=True)
class Record:
    parametrization: str
    width: int
    step: int
    module: str
    mean_abs: float


def _watched_modules(model: nn.Module) -> dict[str, nn.Module]:
    """embedding, per layer (attention, mlp, block output) and the logits."""
    layers = next(m for m in model.modules() if isinstance(m, nn.ModuleList))
    out = {"embed": model.get_input_embeddings()}
    for i, layer in enumerate(layers):
        out[f"layer{i}.attn"] = getattr(layer, "self_attn", None) or layer.attn
        out[f"layer{i}.mlp"] = layer.mlp
        out[f"layer{i}"] = layer
    out["logits"] = model.get_output_embeddings()
    return out


def _optimizer(model: nn.Module, parametrization: str, lr: float) -> torch.optim.Optimizer:
    from hf_optim.optim.adam.optimizers import AdamW

    from .groups import param_overrides

    overrides = param_overrides(model, family="adam", wd_rule="none") if parametrization == "mup" else None
    return AdamW(model.parameters(), lr=lr, weight_decay=0.0, param_overrides=overrides)


def run_one(
    parametrization: str,
    width: int,
    *,
    base_width: int,
    model: str = "llama",
    steps: int = 4,
    lr: float = 3e-3,
    batch_size: int = 4,
    seq_len: int = 32,
    num_layers: int = 2,
    vocab_size: int = 256,
    seed: int = 0,
) -> list[Record]:
    """Train one model for ``steps`` Adam steps and return the per-module mean |activation| at every step."""
    from transformers import AutoModelForCausalLM

    from .surgery import make_mup_model

    torch.manual_seed(seed)
    config = _config(model, width, num_layers, vocab_size, seq_len)
    config._attn_implementation = "eager"
    net = (
        AutoModelForCausalLM.from_config(config)
        if parametrization == "sp"
        else make_mup_model(config, base_width=base_width)
    )
    net.train()
    opt = _optimizer(net, parametrization, lr)
    records: list[Record] = []
    step_box = [0]

    def hook(name: str) -> Callable:
        def fn(module: nn.Module, args: Any, output: Any) -> None:
            out = output[0] if isinstance(output, tuple) else output
            value = out.detach().abs().double().mean().item()
            records.append(Record(parametrization, width, step_box[0], name, value))

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in _watched_modules(net).items()]
    try:
        for step, tokens in enumerate(_batches(vocab_size, batch_size, seq_len, steps)):
            step_box[0] = step
            _train_step(net, opt, tokens, f"{parametrization} width={width}", step)
    finally:
        for h in handles:
            h.remove()
    return records


def coord_check(
    widths: Sequence[int] = (64, 128, 256, 512, 1024),
    *,
    base_width: int | None = None,
    parametrizations: Sequence[str] = PARAMETRIZATIONS,
    progress: Callable[[str], None] | None = None,
    **kwargs: Any,
) -> list[Record]:
    """Run :func:`run_one` for every width and parametrization; ``base_width`` defaults to the smallest width."""
    widths = sorted(int(w) for w in widths)
    if not widths:
        raise ValueError("widths must name at least one width, got an empty list.")
    for p in parametrizations:
        v.check_choice("parametrizations", p, PARAMETRIZATIONS)
    base_width = widths[0] if base_width is None else base_width
    run = partial(run_one, base_width=base_width, **kwargs)
    return _sweep(parametrizations, widths, run, "{p:3s} width={size:5d}", progress)


def table(records: Sequence[Record]) -> dict[tuple[str, str, int], dict[int, float]]:
    """(parametrization, module, step) -> {width: mean |activation|}."""
    out: dict[tuple[str, str, int], dict[int, float]] = {}
    for r in records:
        out.setdefault((r.parametrization, r.module, r.step), {})[r.width] = r.mean_abs
    return out


def spread(records: Sequence[Record], parametrization: str, module: str, step: int) -> float:
    """max / min of a module's mean |activation| across widths at ``step``."""
    values = table(records)[(parametrization, module, step)].values()
    return max(values) / min(values)


def growth(records: Sequence[Record], parametrization: str, module: str, step: int) -> float:
    """Mean |activation| at the largest width / at the smallest, at ``step``."""
    by_width = table(records)[(parametrization, module, step)]
    return by_width[max(by_width)] / by_width[min(by_width)]


def write_csv(records: Sequence[Record], path: str | os.PathLike) -> None:
    _write_csv(records, Record.__dataclass_fields__, path)


def plot(records: Sequence[Record], path: str | os.PathLike, title: str = "") -> None:
    """One panel per (parametrization, step): mean |activation| vs width, one line per module (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = [p for p in PARAMETRIZATIONS if any(r.parametrization == p for r in records)]
    steps = sorted({r.step for r in records})
    modules = list(dict.fromkeys(r.module for r in records))
    data = table(records)
    fig, axes = plt.subplots(
        len(params), len(steps), figsize=(3.2 * len(steps), 3.0 * len(params)), sharex=True, sharey="row", squeeze=False
    )
    for i, p in enumerate(params):
        for j, step in enumerate(steps):
            ax = axes[i][j]
            for k, module in enumerate(modules):
                by_width = data.get((p, module, step), {})
                ws = sorted(by_width)
                ax.plot(
                    ws,
                    [by_width[w] for w in ws],
                    marker="o",
                    ms=3,
                    label=module,
                    color=plt.cm.viridis(k / max(1, len(modules) - 1)),
                )
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{p.upper()}  step {step}", fontsize=9)
            if i == len(params) - 1:
                ax.set_xlabel("width")
            if j == 0:
                ax.set_ylabel("mean |activation|")
    _save_figure(fig, axes, path, title)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-optim coord-check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", default="64,128,256,512,1024", help="comma-separated hidden sizes")
    parser.add_argument("--base-width", type=int, default=None, help="muP base width (default: smallest width)")
    parser.add_argument("--model", choices=MODELS, default="llama")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=".", help="where coord_check.csv and coord_check.png go")
    parser.add_argument(
        "--depths",
        default=None,
        help="comma-separated depths: run the depth check instead "
        "(width-only muP vs depth-µP vs CompleteP at a fixed --width; base depth = smallest)",
    )
    parser.add_argument("--width", type=int, default=64, help="hidden size of the depth check")
    args = parser.parse_args(argv)
    _check_options(parser, args)
    if args.depths is not None:
        return _main_depth(parser, args)
    widths = _ints(parser, "--widths", args.widths)
    if not widths or min(widths) < 1 or (args.base_width is not None and args.base_width < 1):
        parser.error(f"--widths must be integers >= 1 (and --base-width >= 1), got --widths {args.widths!r}")
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    records = coord_check(widths, base_width=args.base_width, num_layers=args.layers, **_run_options(args))
    os.makedirs(args.out_dir, exist_ok=True)
    csv_path, png_path = os.path.join(args.out_dir, "coord_check.csv"), os.path.join(args.out_dir, "coord_check.png")
    write_csv(records, csv_path)
    plot(records, png_path, title=f"{args.model}, Adam lr={args.lr}, {args.layers} layers")
    last = args.steps - 1
    hidden = sorted({r.module for r in records if r.module.startswith("layer")})
    print(f"largest/smallest-width ratio of mean |activation| at step {last} (hidden modules: worst case):")
    for p in PARAMETRIZATIONS:
        worst = max(growth(records, p, m, last) for m in hidden)
        print(f"  {p:3s} {worst:8.2f}x   (logits {growth(records, p, 'logits', last):.2f}x)")
    print(f"wrote {csv_path} and {png_path}")
    return 0


def _check_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Everything checkable from the command line alone, before any model is built or file written."""
    for flag in ("steps", "batch_size", "seq_len", "layers"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be an integer >= 1, got {getattr(args, flag)}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        parser.error(f"--lr must be a finite number > 0, got {args.lr}")
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        parser.error(f"--out-dir {args.out_dir!r} exists and is not a directory")


def _ints(parser: argparse.ArgumentParser, flag: str, text: str) -> list[int]:
    """A comma-separated list of integers from the command line (a usage error otherwise)."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        parser.error(f"{flag} must be comma-separated integers, got {text!r}")


def _run_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options the width and the depth check take alike, so both runs of one command line train the same way."""
    return {
        "model": args.model,
        "steps": args.steps,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "seed": args.seed,
        "progress": lambda line: print(line, flush=True),
    }


def _main_depth(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from . import coord_check_depth as ccd

    depths = _ints(parser, "--depths", args.depths)
    if not depths or min(depths) < 1 or args.width < 1 or args.steps < 1:
        parser.error(
            f"--depths must be integers >= 1 and --width, --steps >= 1; got --depths {args.depths!r}, "
            f"--width {args.width}, --steps {args.steps}"
        )
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    records = ccd.coord_check_depth(depths, width=args.width, **_run_options(args))
    os.makedirs(args.out_dir, exist_ok=True)
    csv_path = os.path.join(args.out_dir, "coord_check_depth.csv")
    png_path = os.path.join(args.out_dir, "coord_check_depth.png")
    ccd.write_csv(records, csv_path)
    ccd.plot(records, png_path, title=f"{args.model}, width {args.width}, Adam lr={args.lr}, base depth {min(depths)}")
    print("\n".join(ccd.report(records, args.steps)))
    print(f"wrote {csv_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
