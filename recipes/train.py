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
        --config_file recipes/accelerate/ddp.yaml -m recipes.train demo run.max_steps=20
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import build, schema

log = logging.getLogger("recipes.train")

MODEL_DEFAULTS = {"arch": "llama", "hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": None,
                  "tie_word_embeddings": False, "mup": None}
DATA_DEFAULTS = {"corpus": "tinyshakespeare", "tokenizer": "char", "block_size": 128, "val_fraction": 0.1,
                 "max_tokens": None}
RUN_DEFAULTS = {"max_steps": 200, "batch_size": 16, "grad_accum": 1, "output_dir": None, "logging_steps": 10,
                "save_steps": 100, "eval_steps": 100, "eval_batches": 8, "seed": 0, "size": None, "bf16": False,
                "save_total_limit": 2, "unfactored_fallback": False}


def _section(recipe: Mapping[str, Any], name: str, defaults: Mapping[str, Any]) -> dict[str, Any]:
    given = recipe.get(name) or {}
    return {**defaults, **{k: v for k, v in given.items() if v is not None}}


def build_model(model_cfg: Mapping[str, Any], vocab_size: int, block_size: int):
    """A LLaMA or GPT-2 causal LM from config; with ``mup.base_width`` a muP model (plan in ``config.mup``)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    width, layers, heads = model_cfg["hidden_size"], model_cfg["num_layers"], model_cfg["num_heads"]
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

    plan_kwargs = {k: mup[k] for k in ("zero_readout", "zero_query", "output_mult") if mup.get(k) is not None}
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
                cls, kwargs = build.optimizer_cls_and_kwargs(self.recipe, opt_model)
                kwargs = build.check_deepspeed(cls, kwargs, deepspeed=self._deepspeed,
                                               fallback=bool(self.recipe.get("run", {}).get("unfactored_fallback")))
                self.optimizer_cls_and_kwargs = (cls, kwargs)
            return super().create_optimizer(model)

        def create_scheduler(self, num_training_steps: int, optimizer=None):
            if self.lr_scheduler is None:
                self.lr_scheduler = build.build_scheduler(self.recipe, optimizer or self.optimizer, num_training_steps)
                self._created_lr_scheduler = True
            return self.lr_scheduler

    return RecipeTrainer


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
    if train:
        ax.plot(*zip(*train), label="train")
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set(xlabel="optimizer step", ylabel="loss (nats/token)", title=summary["recipe"])
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=100)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hf-optim train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", nargs="?", default="demo",
                        help=f"recipe file or bundled name (default: demo). Bundled: {', '.join(schema.bundled_names())}")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. run.max_steps=50 optimizer.lr=3e-3")
    parser.add_argument("--output-dir", help="overrides run.output_dir (default runs/<recipe name>)")
    parser.add_argument("--resume", nargs="?", const=True, default=None,
                        help="continue from the latest checkpoint in the output dir (or from the given checkpoint)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers
    from transformers import TrainingArguments, default_data_collator, set_seed

    from .data import load_corpus

    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = schema.load(args.recipe, args.overrides)
    model_cfg = _section(recipe, "model", MODEL_DEFAULTS)
    data_cfg = _section(recipe, "data", DATA_DEFAULTS)
    run = _section(recipe, "run", RUN_DEFAULTS)
    recipe["run"] = run
    out = Path(args.output_dir or run["output_dir"] or Path("runs") / recipe["name"])
    mup = model_cfg.get("mup") or {}
    wd = (recipe.get("optimizer") or {}).get("weight_decay")
    if mup.get("base_width") and wd and not mup.get("wd_rule"):
        raise schema.RecipeError(
            "model.mup.wd_rule must be set when muP is on and weight_decay > 0: 'independent' (per-step decay "
            "wd * schedule at every width; wd ~1e-4), 'mup' (mup 1.0.0's MuAdamW: wd x width_mult on hidden "
            "matrices) or 'none'.")

    set_seed(run["seed"])
    corpus = load_corpus(data_cfg["corpus"], tokenizer=data_cfg["tokenizer"], block_size=data_cfg["block_size"],
                         val_fraction=data_cfg["val_fraction"], max_tokens=data_cfg["max_tokens"])
    model = build_model(model_cfg, corpus.vocab_size, data_cfg["block_size"])
    val = corpus.val.select(range(min(len(corpus.val), run["eval_batches"] * run["batch_size"])))
    lr = build.size_settings(recipe, run["size"])["lr"]
    max_grad_norm = (recipe.get("training") or {}).get("max_grad_norm")
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    training_args = TrainingArguments(
        output_dir=str(out), max_steps=run["max_steps"], per_device_train_batch_size=run["batch_size"],
        per_device_eval_batch_size=run["batch_size"], gradient_accumulation_steps=run["grad_accum"],
        # The optimizer and schedule come from the recipe (RecipeTrainer); these two are recorded for the logs and
        # give the decay group its weight decay.
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
    main_process = trainer.is_world_process_zero()
    if main_process:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"[hf-optim] recipe {recipe['name']} ({recipe['_path']}): {model_cfg['arch']} "
              f"width {model_cfg['hidden_size']} x {model_cfg['num_layers']} layers, {n_params / 1e6:.2f}M params"
              f"{', muP base width ' + str(mup['base_width']) if mup.get('base_width') else ''}; "
              f"optimizer {recipe['optimizer']['name']} lr {lr}; {len(corpus.train)} train blocks of "
              f"{data_cfg['block_size']} {data_cfg['tokenizer']} tokens; transformers {transformers.__version__}",
              flush=True)
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
            "world_size": training_args.world_size, "output_dir": str(out.resolve()),
        }
        out.mkdir(parents=True, exist_ok=True)
        _write_outputs(out, history, summary)
        first = f"{initial_eval:.3f}" if initial_eval is not None else "n/a (resumed)"
        print(f"[hf-optim] done in {summary['seconds']}s, {summary['steps']} steps. Validation loss at step 0: "
              f"{first} -> final: {final_eval:.3f} (uniform guess: {summary['uniform_loss']:.3f}).\n"
              f"[hf-optim] outputs in {out.resolve()}: metrics.json, metrics.csv, loss.png, checkpoint-*/", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
