"""The command line of ``hf-optim train``: its arguments, and ``--resume`` settled at parsing."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from . import schema


def parse_args(argv: Sequence[str] | None, description: str = "") -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="hf-optim train",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "recipe",
        nargs="?",
        default="demo",
        help=f"recipe file or bundled name (default: demo). Bundled: {', '.join(schema.bundled_names())}",
    )
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. run.max_steps=50 optimizer.lr=3e-3")
    parser.add_argument(
        "--output-dir",
        help="overrides run.output_dir (default runs/<the recipe's name: field>, e.g. "
        "runs/shakespeare_mup_llama_adafactor for demo; the first lines printed show it)",
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        help="continue from the latest checkpoint in the output dir (or from the given checkpoint)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads per process (overrides run.threads; default 1 on CPU, torch's choice on GPU)",
    )
    # intermixed: overrides may follow an option (`--output-dir out run.max_steps=50`), as users type them
    args = parser.parse_intermixed_args(argv)
    _check_resume(parser, args)
    return args


def _check_resume(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--resume``'s optional value is a checkpoint directory; settle what it is at parsing, before any model is built.

    argparse gives an optional value the next token, so ``--resume run.max_steps=200`` (what the end-of-run hint
    suggests in words) hands the override to ``--resume``. A ``section.key=value`` token that is not a directory is
    the override the user wrote and goes back to the overrides; any other missing path is an error naming it.
    """
    value = args.resume
    if not isinstance(value, str) or Path(value).is_dir():
        return
    if "=" in value and "." in value.split("=", 1)[0]:
        args.overrides.append(value)
        args.resume = True
        return
    parser.error(
        f"--resume {value!r}: no such checkpoint directory (give a checkpoint-N directory, or --resume alone "
        "for the latest checkpoint in the output dir)"
    )
