"""``hf-optim`` command line: one entry point, each sub-command living in its own module (imported only when run)."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Sequence

# sub-command -> (module with `main(argv) -> int`, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("hf_optim.runner.train", "train a model with a recipe (default: the bundled CPU demo)"),
    "bench": ("hf_optim.bench", "time optimizer steps and measure state bytes against fused AdamW"),
    "bench-startup": ("hf_optim.bench.startup", "what the .pth import hook adds to Python start-up"),
    "sweep": ("hf_optim.runner.sweep", "width x learning-rate x weight-decay sweeps (muP / decay-mode experiments)"),
    "mutransfer": (
        "hf_optim.runner.mutransfer",
        "tune a small muP proxy, write the target's recipe (tuned.yaml), check the transfer",
    ),
    "coord-check": ("mup_integration.coord_check", "muP coordinate check: activation size per width, SP vs muP"),
    "export": ("mup_integration.export", "write a muP checkpoint as a stock Granite/LLaMA model (same logits)"),
    "groups": (
        "hf_optim.runner.groups",
        "the parameter groups of a recipe or model config: pattern -> lr, decay, count",
    ),
    "list": ("hf_optim.cli", "list the registered optimizers (--recipes: the bundled recipes and sweeps)"),
}

#: The extra of pyproject.toml a command needs beyond the core (torch, transformers), and its modules.
TRAIN_EXTRA = ("train", ("accelerate", "datasets", "matplotlib"))
NEEDS_EXTRA: dict[str, tuple[str, tuple[str, ...]]] = {
    "train": TRAIN_EXTRA,
    "sweep": TRAIN_EXTRA,
    "mutransfer": TRAIN_EXTRA,
    "coord-check": ("train", ("matplotlib",)),
}


def missing_extra(command: str) -> str | None:
    """The message for a command whose extra is not installed (``None`` when everything it needs is there)."""
    if command not in NEEDS_EXTRA:
        return None
    extra, modules = NEEDS_EXTRA[command]
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if not missing:
        return None
    return (
        f"hf-optim {command} needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed: "
        f"pip install 'hf-optim[{extra}]' (the optimizers and the Trainer plugin work without it)."
    )


def list_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hf-optim list",
        description="List the registered optimizers, or with --recipes the bundled recipes and sweeps.",
    )
    parser.add_argument(
        "--recipes",
        action="store_true",
        help="list the bundled recipes (hf-optim train NAME) and sweep configs (hf-optim sweep NAME) instead",
    )
    args = parser.parse_args(argv)
    if args.recipes:
        from .runner.schema import describe_bundled

        for kind, name, title in describe_bundled():
            print(f"{kind:7s} {name:32s} {title}")
        return 0
    from .registry import list_optimizers

    for spec in list_optimizers():
        print(f"{spec.name:14s} {spec.description}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from ._cli_errors import USER_ERRORS, report, take_debug_flag

    argv = take_debug_flag(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0] in {"-h", "--help"}:
        print("usage: hf-optim {" + ",".join(COMMANDS) + "} [args...]\n")
        for name, (_, help_text) in COMMANDS.items():
            print(f"  {name:12s} {help_text}")
        print("\nRun 'hf-optim COMMAND --help' for the options of a command; --debug (anywhere) shows the traceback")
        print("of an error instead of its one-line message.")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        from ._validation import closest

        print(
            f"hf-optim: unknown command {command!r}.{closest(command, COMMANDS)} Choose from {list(COMMANDS)}.",
            file=sys.stderr,
        )
        return 2
    if (message := missing_extra(command)) is not None:
        print(message, file=sys.stderr)
        return 2
    try:
        if command == "list":
            return list_main(rest)
        module = importlib.import_module(COMMANDS[command][0])
        if command == "train":  # a launched rank ends in train.main: see hf_optim.runner._shutdown
            return int(module.main(rest, exit_process=True) or 0)
        return int(module.main(rest) or 0)
    except USER_ERRORS as error:
        return report(command, error)


if __name__ == "__main__":
    sys.exit(main())
