"""``hf-optim train RECIPE [section.key=value ...]``: train a small LLaMA / GPT-2 from config with a recipe.

The model is built from a config (never downloaded), optionally with muP (``model.mup.base_width``); the corpus is
the bundled tiny Shakespeare unless ``data.corpus`` names a text file; training runs in the Hugging Face Trainer
(progress bar, checkpoints every ``run.save_steps``, ``--resume`` continues from the latest one). Outputs in
``run.output_dir``: checkpoints, ``metrics.json``, ``metrics.csv`` and ``loss.png``. The same command works under
``accelerate launch`` (DDP, FSDP2, DeepSpeed: see ``recipes/accelerate/``).

Examples::

    hf-optim train demo
    hf-optim train llm/llama2 run.max_steps=200 schedule.warmup_steps=20 optimizer.lr=3e-3
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 \\
        --config_file recipes/accelerate/ddp.yaml $(which hf-optim) train demo run.max_steps=20
    # the same with the module instead of the console script: ... ddp.yaml -m hf_optim.runner.train demo run.max_steps=20

A recipe mistake (unknown key, bad value, too small a validation split) prints one line to stderr and returns 2.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .._cli_errors import report, take_debug_flag
from . import _outputs, _process_group, _shutdown, _train_model, _trainer, build, horizon, schema
from ._train_args import parse_args as _parse_args
from ._trainer import config_errors as _config_errors
from ._trainer import make_trainer_class as _make_trainer_class

log = logging.getLogger(__name__)

DATA_DEFAULTS = {
    "corpus": "tinyshakespeare",
    "tokenizer": "char",
    "block_size": 128,
    "val_fraction": 0.1,
    "max_tokens": None,
}
RUN_DEFAULTS = {
    "max_steps": 200,
    "batch_size": 16,
    "grad_accum": 1,
    "output_dir": None,
    "logging_steps": 10,
    "save_steps": 100,
    "eval_steps": 100,
    "eval_batches": 8,
    "seed": 0,
    "size": None,
    "bf16": False,
    "save_total_limit": 2,
    "unfactored_fallback": False,
    "threads": None,
}


def _section(recipe: Mapping[str, Any], name: str, defaults: Mapping[str, Any]) -> dict[str, Any]:
    given = recipe.get(name) or {}
    return {**defaults, **{k: v for k, v in given.items() if v is not None}}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return _parse_args(argv, description=__doc__.split("\n\n")[0])


def main(argv: Sequence[str] | None = None, *, exit_process: bool = False) -> int:
    """``hf-optim train``: 0 on success, 2 (one line on stderr) for a recipe mistake, as ``hf-optim sweep`` does.

    ``exit_process`` (the command line's entry points): a rank under a multi-process launcher ends here, see
    :func:`hf_optim.runner._shutdown.end_launched_process`; in-process callers get the code back.
    """
    t_launch = time.time()
    args = parse_args(take_debug_flag(list(sys.argv[1:] if argv is None else argv)))
    try:
        code = _train(args, t_launch)
    except schema.RecipeError as error:
        # The message names the field, the value and what is allowed; a 40-line traceback would only bury it.
        _process_group.destroy()  # the error may come after the Trainer joined a process group
        code = report("train", error)
    _shutdown.stop_progress_monitors()  # no daemon thread may meet the interpreter's finalization: see the module
    if exit_process:
        _shutdown.end_launched_process(code)
    _shutdown.release_kept()
    return code


def _note(message: str, *, warning: bool = False) -> None:
    """One ``[hf-optim]`` line from rank 0 only (a warning goes to stderr)."""
    if _process_group.rank() == 0:
        print(
            f"[hf-optim] {'warning: ' if warning else ''}{message}",
            file=sys.stderr if warning else sys.stdout,
            flush=True,
        )


def _threads(args: argparse.Namespace, run: Mapping[str, Any]) -> tuple[int | None, str]:
    """Intra-op threads: ``--threads``, else ``run.threads``, else 1 per process on CPU (torch's choice on GPU).

    torch's default on CPU is one thread per core; its OpenMP threads spin-wait for each other, and with several
    processes (DDP ranks, other jobs) on a few cores a small model's step gets 10x slower (issue 14 measured 25 s for
    20 llama2 steps at load 4 against 1.7 s on one thread).
    """
    threads, origin = (args.threads, "--threads") if args.threads is not None else (run["threads"], "run.threads")
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise schema.RecipeError(f"run.threads / --threads must be an integer >= 1, got {threads!r}.")
        return threads, origin
    import torch

    on_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available()
    return (1, "default on CPU; --threads N to change") if on_cpu else (None, "torch's default")


def _check_run(run: Mapping[str, Any]) -> None:
    for key in ("max_steps", "batch_size", "grad_accum", "eval_batches", "logging_steps", "eval_steps", "save_steps"):
        value = run[key]
        # 0 evaluation batches would fail much later as KeyError 'eval_loss'; 0 steps / batch size make no run.
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise schema.RecipeError(f"run.{key} must be an integer >= 1, got {value!r}.")


def _fit_schedule(args: argparse.Namespace, recipe: Mapping[str, Any], run: Mapping[str, Any]) -> horizon.Fit:
    """The recipe's schedule fitted to ``run.max_steps`` (see :mod:`hf_optim.runner.horizon`), announced in a line.

    Checked before the corpus and model are built, so a bad warm-up or floor fails in a second, not after the first
    step (the Trainer builds the scheduler inside train()).
    """
    try:  # the horizon the recipe file was written for: its own run.max_steps, before command-line overrides
        file_steps = (schema.load(args.recipe).get("run") or {}).get("max_steps")
    except schema.RecipeError:
        file_steps = None
    with _config_errors("schedule"):
        fit = horizon.fit(
            recipe,
            run["max_steps"],
            size=run["size"],
            horizon=horizon.recipe_horizon(recipe, run["size"], file_steps),
            fixed=horizon.fixed_keys(args.overrides),
        )
    missing = build.unstated_schedule_fields(recipe, run["size"])
    if missing:
        log.warning("Recipe %s does not state the schedule's %s.", recipe.get("name"), " or ".join(missing))
    return fit


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """Everything decided from the recipe and the command line, checked before any data or model work."""
    recipe = schema.load(args.recipe, args.overrides)
    model_cfg = _section(recipe, "model", _train_model.MODEL_DEFAULTS)
    data_cfg = _section(recipe, "data", DATA_DEFAULTS)
    run = _section(recipe, "run", RUN_DEFAULTS)
    threads, threads_origin = _threads(args, run)
    _check_run(run)
    recipe["run"] = run
    fit = _fit_schedule(args, recipe, run)
    mup = model_cfg.get("mup") or {}
    wd = build.weight_decay(recipe, run["size"])  # a number: the 'lr_peak' sentinel resolved for this size
    if mup.get("base_width") and wd and not mup.get("wd_rule"):
        raise schema.RecipeError(
            "model.mup.wd_rule must be set when muP is on and weight_decay > 0: 'independent' (per-step decay "
            "wd * schedule at every width; wd ~1e-4), 'mup' (mup 1.0.0's MuAdamW: wd x width_mult on hidden "
            "matrices) or 'none'."
        )
    lr = build.size_settings(recipe, run["size"])["lr"]
    with _config_errors("optimizer"):
        build.dry_build(recipe, size=run["size"])
    out = Path(args.output_dir or run["output_dir"] or Path("runs") / recipe["name"])
    if args.resume is True:
        _check_has_checkpoint(out)
    if args.resume:
        from transformers.trainer_utils import get_last_checkpoint

        checkpoint = args.resume if isinstance(args.resume, str) else get_last_checkpoint(str(out))
        with _config_errors("resume"):
            build.check_resume_family(recipe, checkpoint, size=run["size"])
    return {
        "recipe": recipe,
        "model": model_cfg,
        "data": data_cfg,
        "run": run,
        "threads": threads,
        "threads_origin": threads_origin,
        "fit": fit,
        "wd": wd,
        "lr": lr,
        "out": out,
    }


def _check_has_checkpoint(out: Path) -> None:
    """``--resume`` alone continues from the latest ``checkpoint-N`` in the output dir: there must be one."""
    from transformers.trainer_utils import get_last_checkpoint

    if not (out.is_dir() and get_last_checkpoint(str(out))):
        raise schema.RecipeError(
            f"--resume: no checkpoint-N directory in the output dir {out.resolve()}; run without --resume first, "
            "point --output-dir at the earlier run, or give --resume PATH/checkpoint-N"
        )


def _training_arguments(s: Mapping[str, Any]):
    from transformers import TrainingArguments

    run, recipe, lr = s["run"], s["recipe"], s["lr"]
    max_grad_norm = (recipe.get("training") or {}).get("max_grad_norm")
    with _config_errors("run"):  # e.g. run.bf16 on a machine without bf16 support
        return TrainingArguments(
            output_dir=str(s["out"]),
            max_steps=run["max_steps"],
            per_device_train_batch_size=run["batch_size"],
            per_device_eval_batch_size=run["batch_size"],
            gradient_accumulation_steps=run["grad_accum"],
            # The optimizer and schedule come from the recipe (RecipeTrainer); these two are recorded for the logs
            # and give the decay group its weight decay (under DeepSpeed, max_grad_norm and grad_accum also fill
            # the 'auto' values of recipes/accelerate/deepspeed_zero*.yaml).
            learning_rate=lr if lr is not None else 1e-3,
            weight_decay=s["wd"] or 0.0,
            max_grad_norm=max_grad_norm if max_grad_norm is not None else 0.0,
            logging_steps=run["logging_steps"],
            logging_first_step=True,
            eval_strategy="steps",
            eval_steps=run["eval_steps"],
            save_strategy="steps",
            save_steps=run["save_steps"],
            save_total_limit=run["save_total_limit"],
            seed=run["seed"],
            bf16=run["bf16"],
            report_to=[],
            dataloader_num_workers=0,
            dataloader_pin_memory=False,
            disable_tqdm=False,
        )


def _header(s: Mapping[str, Any], model: Any, corpus: Any, world_size: int) -> str:
    import torch
    import transformers

    recipe, model_cfg, data_cfg, run, fit = s["recipe"], s["model"], s["data"], s["run"], s["fit"]
    mup = model_cfg.get("mup") or {}
    n_params = sum(p.numel() for p in model.parameters())
    lr = s["lr"]
    # The peak this run reaches (a schedule kept longer than the run stops short of the recipe's peak).
    peak = f"peak lr {lr * fit.peak_multiplier:.3g}" if lr is not None else "peak lr: the optimizer's default"
    if lr is not None and fit.peak_multiplier < 0.999:
        peak += f" ({fit.peak_multiplier:.0%} of the recipe's {lr:.3g})"
    return (
        f"[hf-optim] recipe {recipe['name']} ({recipe['_path']})\n"
        f"[hf-optim] model: {model_cfg['arch']} width {model_cfg['hidden_size']} x {model_cfg['num_layers']} "
        f"layers, {n_params / 1e6:.2f}M params"
        f"{', muP base width ' + str(mup['base_width']) if mup.get('base_width') else ''}; "
        f"optimizer {recipe['optimizer']['name']}, {peak} (schedule {fit.schedule})\n"
        f"[hf-optim] data: {data_cfg['corpus']}, {len(corpus.train)} training blocks of {data_cfg['block_size']} "
        f"{data_cfg['tokenizer']} tokens; {run['max_steps']} steps x "
        f"{run['batch_size'] * run['grad_accum'] * world_size} blocks\n"
        f"[hf-optim] outputs -> {s['out'].resolve()} (transformers {transformers.__version__}, "
        f"torch threads: {torch.get_num_threads()}, {s['threads_origin']})"
    )


def _make_trainer(s: Mapping[str, Any], model: Any, corpus: Any):
    from transformers import default_data_collator
    from transformers.trainer_callback import ProgressCallback

    run = s["run"]
    val = corpus.val.select(range(min(len(corpus.val), run["eval_batches"] * run["batch_size"])))
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    trainer = _make_trainer_class()(
        model=model,
        args=_training_arguments(s),
        train_dataset=corpus.train,
        eval_dataset=val,
        data_collator=default_data_collator,
        recipe=s["recipe"],
        deepspeed=deepspeed,
        schedule_fit=s["fit"],
    )
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(_trainer.progress_callback_class())
    return trainer


def _summary(s: Mapping[str, Any], trainer: Any, corpus: Any, final_eval: float, times: tuple[float, float]) -> dict:
    history = trainer.state.log_history
    losses = [r["loss"] for r in history if "loss" in r]
    start, t_launch = times
    first_step = getattr(trainer, "_initial_global_step", 0) or 0
    lr = s["lr"]
    return {
        "recipe": s["recipe"]["name"],
        "recipe_path": s["recipe"]["_path"],
        # this run's optimizer steps; global_step counts those of the run it resumed too
        "steps": trainer.state.global_step - first_step,
        "global_step": trainer.state.global_step,
        "resumed_from_step": first_step or None,
        "first_logged_loss": losses[0] if losses else None,
        "final_logged_loss": losses[-1] if losses else None,
        "initial_eval_loss": _outputs.step_zero_loss(history),
        "final_eval_loss": final_eval,
        "uniform_loss": math.log(corpus.vocab_size),
        "seconds": round(time.time() - start, 1),
        "total_seconds": round(time.time() - t_launch, 1),
        "world_size": trainer.args.world_size,
        "output_dir": str(s["out"].resolve()),
        "peak_lr": lr * s["fit"].peak_multiplier if lr is not None else None,
        "recipe_peak_lr": lr,
        "schedule": s["fit"].as_dict(),
        "torch_threads": s["threads"],
    }


def _train(args: argparse.Namespace, t_launch: float) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from transformers import set_seed

    from .data import load_corpus

    s = _settings(args)
    run, data_cfg, fit = s["run"], s["data"], s["fit"]
    if s["threads"] is not None:
        torch.set_num_threads(s["threads"])
    if fit.announcement():
        _note(fit.announcement())
    if fit.warning(s["lr"]):
        _note(fit.warning(s["lr"]), warning=True)

    set_seed(run["seed"])
    with _config_errors("data"):
        corpus = load_corpus(
            data_cfg["corpus"],
            tokenizer=data_cfg["tokenizer"],
            block_size=data_cfg["block_size"],
            val_fraction=data_cfg["val_fraction"],
            max_tokens=data_cfg["max_tokens"],
        )
    with _config_errors("model"):
        model = _train_model.build_model(s["model"], corpus.vocab_size, data_cfg["block_size"])
    trainer = _make_trainer(s, model, corpus)
    _shutdown.keep_until_exit(trainer)  # its process group must not be torn down in-process: see there
    main_process = trainer.is_world_process_zero()
    if main_process:
        print(_header(s, model, corpus, trainer.args.world_size), flush=True)
    start = time.time()
    initial_eval = None if args.resume else trainer.evaluate()["eval_loss"]
    trainer.add_callback(_trainer.step_zero_callback_class()(initial_eval))
    trainer.train(resume_from_checkpoint=args.resume)
    final_eval = trainer.evaluate()["eval_loss"]
    summary = _summary(s, trainer, corpus, final_eval, (start, t_launch)) if main_process else None
    _process_group.leave()  # before the outputs: see its docstring
    if summary is not None:
        s["out"].mkdir(parents=True, exist_ok=True)
        _outputs.write_outputs(s["out"], trainer.state.log_history, summary)
        _outputs.print_summary(summary, s["out"])
    return 0


if __name__ == "__main__":
    sys.exit(main(exit_process=True))
