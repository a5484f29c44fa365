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
import contextlib
import csv
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from . import build, schema

log = logging.getLogger(__name__)

MODEL_DEFAULTS = {"arch": "llama", "hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": None,
                  "tie_word_embeddings": False, "mup": None}
DATA_DEFAULTS = {"corpus": "tinyshakespeare", "tokenizer": "char", "block_size": 128, "val_fraction": 0.1,
                 "max_tokens": None}
RUN_DEFAULTS = {"max_steps": 200, "batch_size": 16, "grad_accum": 1, "output_dir": None, "logging_steps": 10,
                "save_steps": 100, "eval_steps": 100, "eval_batches": 8, "seed": 0, "size": None, "bf16": False,
                "save_total_limit": 2, "unfactored_fallback": False, "threads": None}


@contextlib.contextmanager
def _config_errors(what: str) -> Iterator[None]:
    """Turn a ``ValueError`` raised while applying the recipe into a :class:`~hf_optim.runner.schema.RecipeError`.

    Only around steps driven by the recipe's values (corpus, model config, schedule, optimizer), so that ``main``
    can report a configuration mistake in one line while a genuine bug elsewhere keeps its traceback.
    """
    try:
        yield
    except schema.RecipeError:
        raise
    except ValueError as error:
        raise schema.RecipeError(f"{what}: {error}") from error


def _section(recipe: Mapping[str, Any], name: str, defaults: Mapping[str, Any]) -> dict[str, Any]:
    given = recipe.get(name) or {}
    return {**defaults, **{k: v for k, v in given.items() if v is not None}}


def build_model(model_cfg: Mapping[str, Any], vocab_size: int, block_size: int):
    """A LLaMA or GPT-2 causal LM from config; with ``mup.base_width`` a muP model (plan in ``config.hf_optim_mup``)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    width, layers, heads = model_cfg["hidden_size"], model_cfg["num_layers"], model_cfg["num_heads"]
    for key in ("hidden_size", "num_layers", "num_heads"):
        if isinstance(model_cfg[key], bool) or not isinstance(model_cfg[key], int) or model_cfg[key] < 1:
            raise ValueError(f"model.{key} must be an integer >= 1, got {model_cfg[key]!r}.")
    if width % heads:
        # Checked here: transformers' own check raises a huggingface_hub error that is not a ValueError.
        raise ValueError(f"model.hidden_size={width} must be a multiple of model.num_heads={heads} "
                         f"(each head gets hidden_size / num_heads dimensions).")
    if model_cfg["arch"] == "llama":
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=width, num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=heads,
                             intermediate_size=model_cfg["intermediate_size"] or 4 * width,
                             max_position_embeddings=block_size, tie_word_embeddings=model_cfg["tie_word_embeddings"],
                             use_cache=False)
        model_cls = LlamaForCausalLM
    else:
        config = GPT2Config(vocab_size=vocab_size, n_embd=width, n_layer=layers, n_head=heads, n_positions=block_size,
                            n_inner=model_cfg["intermediate_size"], tie_word_embeddings=model_cfg["tie_word_embeddings"],
                            use_cache=False)
        model_cls = GPT2LMHeadModel
    mup = model_cfg.get("mup") or {}
    if not mup.get("base_width"):
        return model_cls(config)
    from mup_integration.surgery import make_mup_model

    # base_depth + depth_alpha (both or neither, checked by make_plan): depth scaling, see mup_integration.depth
    plan_kwargs = {k: mup[k] for k in ("zero_readout", "zero_query", "output_mult", "base_depth", "depth_alpha")
                   if mup.get(k) is not None}
    return make_mup_model(config, base_width=mup["base_width"], model_cls=model_cls, **plan_kwargs)


def _make_trainer_class():
    from transformers import Trainer

    class RecipeTrainer(Trainer):
        """Trainer whose optimizer, decay groups and lr schedule come from a recipe."""

        def __init__(self, *args: Any, recipe: Mapping[str, Any], deepspeed: bool = False, **kwargs: Any) -> None:
            self.recipe = recipe
            self._deepspeed = deepspeed
            super().__init__(*args, **kwargs)

        def get_decay_parameter_names(self, model):
            return build.decay_parameter_names(model, (self.recipe.get("optimizer") or {}).get("no_decay"))

        def create_optimizer(self, model=None):
            if self.optimizer is None:
                # Built here, not in main(): under FSDP2 the model is sharded first and muP overrides must be keyed
                # by the sharded Parameters.
                opt_model = self.model if model is None else model
                with _config_errors("optimizer"):
                    cls, kwargs = build.optimizer_cls_and_kwargs(self.recipe, opt_model)
                    kwargs = build.check_deepspeed(cls, kwargs, deepspeed=self._deepspeed,
                                                   fallback=bool(self.recipe.get("run", {}).get("unfactored_fallback")))
                self.optimizer_cls_and_kwargs = (cls, kwargs)
            return super().create_optimizer(model)

        def create_scheduler(self, num_training_steps: int, optimizer=None):
            if self.lr_scheduler is None:
                with _config_errors("schedule"):
                    self.lr_scheduler = build.build_scheduler(self.recipe, optimizer or self.optimizer,
                                                              num_training_steps)
                self._created_lr_scheduler = True
            return self.lr_scheduler

    return RecipeTrainer


def _progress_callback_class():
    from transformers.trainer_callback import ProgressCallback

    class CompactProgress(ProgressCallback):
        """The Trainer's tqdm bar, with one short line per log instead of the full log dict.

        The full dict (per-group ``lr/group_i`` etc.) still goes to ``trainer.state.log_history`` and metrics.json.
        """

        def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
            pass  # validation takes a few batches: its result line is enough, a second bar only flickers

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or self.training_bar is None or not logs:
                return
            head = f"step {state.global_step:>{len(str(state.max_steps))}}/{state.max_steps}"
            if "loss" in logs:
                line = f"{head}  loss {float(logs['loss']):.3f}"
                if "learning_rate" in logs:
                    line += f"  lr {float(logs['learning_rate']):.2e}"
                if logs.get("grad_norm") is not None:
                    line += f"  grad norm {float(logs['grad_norm']):.2f}"
            elif "eval_loss" in logs:
                line = f"{head}  validation loss {float(logs['eval_loss']):.3f}"
            else:
                return  # the end-of-training runtime summary: main() prints its own
            self.training_bar.write(line)

    return CompactProgress


def _write_outputs(out: Path, history: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    (out / "metrics.json").write_text(json.dumps({"summary": summary, "log_history": history}, indent=2))
    keys = ["step", "epoch", "loss", "eval_loss", "learning_rate", "grad_norm"]
    with (out / "metrics.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        for row in history:
            if "loss" in row or "eval_loss" in row:
                writer.writerow(row)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    val = [(r["step"], r["eval_loss"]) for r in history if "eval_loss" in r]
    if summary.get("initial_eval_loss") is not None and not any(step == 0 for step, _ in val):
        # measured before trainer.train(), which starts a fresh log history
        val.insert(0, (0, summary["initial_eval_loss"]))
    if train:
        ax.plot(*zip(*train), label="train")
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set(xlabel="optimizer step", ylabel="loss (nats/token)", title=summary["recipe"])
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=100)
    plt.close(fig)


def _seconds(value: float) -> str:
    return f"{value:.0f} s" if value >= 10 else f"{value:.1f} s"


def _print_summary(summary: Mapping[str, Any], out: Path, args: argparse.Namespace) -> None:
    """A few lines a user can act on: the loss drop, where everything went, how to continue."""
    out = out.resolve()
    final, initial = summary["final_eval_loss"], summary["initial_eval_loss"]
    if initial is None:
        change = f"{final:.3f} after resuming"
    else:
        change = f"{initial:.3f} at step 0 -> {final:.3f} at step {summary['steps']} ({final - initial:+.3f})"
    checkpoints = sorted((p.name for p in out.glob("checkpoint-*")), key=lambda n: int(n.rpartition("-")[2]))
    lines = [
        f"done: {summary['steps']} steps in {_seconds(summary['seconds'])} of training "
        f"({_seconds(summary['total_seconds'])} in all, {summary['world_size']} "
        f"process{'es' if summary['world_size'] > 1 else ''})",
        f"validation loss: {change}; a uniform guess scores {summary['uniform_loss']:.3f} (nats/token)",
        f"outputs:    {out}",
        f"loss curve: {out / 'loss.png'}",
        f"metrics:    {out / 'metrics.json'} (and metrics.csv)",
        f"checkpoints: {', '.join(checkpoints) or 'none'} (to continue: the same command with --resume and a "
        "larger run.max_steps)",
    ]
    print("\n".join(f"[hf-optim] {line}" for line in lines), flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hf-optim train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", nargs="?", default="demo",
                        help=f"recipe file or bundled name (default: demo). Bundled: {', '.join(schema.bundled_names())}")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. run.max_steps=50 optimizer.lr=3e-3")
    parser.add_argument("--output-dir", help="overrides run.output_dir (default runs/<recipe name>)")
    parser.add_argument("--resume", nargs="?", const=True, default=None,
                        help="continue from the latest checkpoint in the output dir (or from the given checkpoint)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (overrides run.threads; default: torch's choice)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """``hf-optim train``: 0 on success, 2 (one line on stderr) for a recipe mistake, as ``hf-optim sweep`` does."""
    t_launch = time.time()
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return _train(args, t_launch)
    except schema.RecipeError as error:
        # The message names the field, the value and what is allowed; a 40-line traceback would only bury it.
        print(f"hf-optim train: {' '.join(str(error).split())}", file=sys.stderr, flush=True)
        _destroy_process_group()  # the error may come after the Trainer joined a process group
        return 2


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _finish_distributed(trainer: Any) -> None:
    """Let every rank leave together and close the process group before the interpreter exits.

    Without this, rank 1 returned while rank 0 was still writing metrics and loss.png; rank 1's live gloo group was
    then torn down at interpreter exit (SIGABRT, "terminate called without an active exception") and the launcher
    SIGTERMed rank 0 before its outputs were complete.
    """
    trainer.accelerator.wait_for_everyone()
    _destroy_process_group()


def _train(args: argparse.Namespace, t_launch: float) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers
    from transformers import TrainingArguments, default_data_collator, set_seed

    from .data import load_corpus

    recipe = schema.load(args.recipe, args.overrides)
    model_cfg = _section(recipe, "model", MODEL_DEFAULTS)
    data_cfg = _section(recipe, "data", DATA_DEFAULTS)
    run = _section(recipe, "run", RUN_DEFAULTS)
    threads = args.threads if args.threads is not None else run["threads"]
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise schema.RecipeError(f"run.threads / --threads must be an integer >= 1, got {threads!r}.")
        # OpenMP threads that spin-wait for each other on a busy machine can make a small model's step 10x slower:
        # the demo pins one thread.
        torch.set_num_threads(threads)
    for key in ("max_steps", "batch_size", "grad_accum", "eval_batches", "logging_steps", "eval_steps",
                "save_steps"):
        value = run[key]
        # 0 evaluation batches would fail much later as KeyError 'eval_loss'; 0 steps / batch size make no run.
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise schema.RecipeError(f"run.{key} must be an integer >= 1, got {value!r}.")
    recipe["run"] = run
    with _config_errors("schedule"):
        # Checked before the corpus and model are built, so a bad warm-up or floor fails in a second, not after
        # the first step (the Trainer builds the scheduler inside train()).
        build.multiplier(recipe, run["max_steps"], run["size"])
    out = Path(args.output_dir or run["output_dir"] or Path("runs") / recipe["name"])
    mup = model_cfg.get("mup") or {}
    wd = build.weight_decay(recipe, run["size"])  # a number: the 'lr_peak' sentinel resolved for this size
    if mup.get("base_width") and wd and not mup.get("wd_rule"):
        raise schema.RecipeError(
            "model.mup.wd_rule must be set when muP is on and weight_decay > 0: 'independent' (per-step decay "
            "wd * schedule at every width; wd ~1e-4), 'mup' (mup 1.0.0's MuAdamW: wd x width_mult on hidden "
            "matrices) or 'none'.")

    set_seed(run["seed"])
    with _config_errors("data"):
        corpus = load_corpus(data_cfg["corpus"], tokenizer=data_cfg["tokenizer"], block_size=data_cfg["block_size"],
                             val_fraction=data_cfg["val_fraction"], max_tokens=data_cfg["max_tokens"])
    with _config_errors("model"):
        model = build_model(model_cfg, corpus.vocab_size, data_cfg["block_size"])
    val = corpus.val.select(range(min(len(corpus.val), run["eval_batches"] * run["batch_size"])))
    lr = build.size_settings(recipe, run["size"])["lr"]
    max_grad_norm = (recipe.get("training") or {}).get("max_grad_norm")
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    with _config_errors("run"):  # e.g. run.bf16 on a machine without bf16 support
        training_args = TrainingArguments(
            output_dir=str(out), max_steps=run["max_steps"], per_device_train_batch_size=run["batch_size"],
            per_device_eval_batch_size=run["batch_size"], gradient_accumulation_steps=run["grad_accum"],
            # The optimizer and schedule come from the recipe (RecipeTrainer); these two are recorded for the logs
            # and give the decay group its weight decay (under DeepSpeed, max_grad_norm and grad_accum also fill
            # the 'auto' values of recipes/accelerate/deepspeed_zero*.yaml).
            learning_rate=lr if lr is not None else 1e-3, weight_decay=wd or 0.0,
            max_grad_norm=max_grad_norm if max_grad_norm is not None else 0.0,
            logging_steps=run["logging_steps"], logging_first_step=True, eval_strategy="steps",
            eval_steps=run["eval_steps"], save_strategy="steps", save_steps=run["save_steps"],
            save_total_limit=run["save_total_limit"], seed=run["seed"], bf16=run["bf16"], report_to=[],
            dataloader_num_workers=0, dataloader_pin_memory=False, disable_tqdm=False,
        )
    trainer = _make_trainer_class()(
        model=model, args=training_args, train_dataset=corpus.train, eval_dataset=val,
        data_collator=default_data_collator, recipe=recipe, deepspeed=deepspeed,
    )
    from transformers.trainer_callback import ProgressCallback

    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(_progress_callback_class())
    main_process = trainer.is_world_process_zero()
    if main_process:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"[hf-optim] recipe {recipe['name']} ({recipe['_path']})\n"
              f"[hf-optim] model: {model_cfg['arch']} width {model_cfg['hidden_size']} x {model_cfg['num_layers']} "
              f"layers, {n_params / 1e6:.2f}M params"
              f"{', muP base width ' + str(mup['base_width']) if mup.get('base_width') else ''}; "
              f"optimizer {recipe['optimizer']['name']}, peak lr {lr}\n"
              f"[hf-optim] data: {data_cfg['corpus']}, {len(corpus.train)} training blocks of {data_cfg['block_size']} "
              f"{data_cfg['tokenizer']} tokens; {run['max_steps']} steps x "
              f"{run['batch_size'] * run['grad_accum'] * training_args.world_size} blocks\n"
              f"[hf-optim] outputs -> {out.resolve()} (transformers {transformers.__version__}, "
              f"torch threads: {torch.get_num_threads()})", flush=True)
    start = time.time()
    initial_eval = None if args.resume else trainer.evaluate()["eval_loss"]
    trainer.train(resume_from_checkpoint=args.resume)
    final_eval = trainer.evaluate()["eval_loss"]
    if main_process:
        history = trainer.state.log_history
        losses = [r["loss"] for r in history if "loss" in r]
        summary = {
            "recipe": recipe["name"], "recipe_path": recipe["_path"], "steps": trainer.state.global_step,
            "first_logged_loss": losses[0] if losses else None, "final_logged_loss": losses[-1] if losses else None,
            "initial_eval_loss": initial_eval, "final_eval_loss": final_eval,
            "uniform_loss": math.log(corpus.vocab_size), "seconds": round(time.time() - start, 1),
            "total_seconds": round(time.time() - t_launch, 1),
            "world_size": training_args.world_size, "output_dir": str(out.resolve()),
        }
        out.mkdir(parents=True, exist_ok=True)
        _write_outputs(out, history, summary)
        _print_summary(summary, out, args)
    _finish_distributed(trainer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
