"""The recipe schema as data: every allowed key and its type (:data:`SCHEMA`), the per-size keys, the fields a
published recipe must state (:data:`PUBLISHED_FIELDS`), and the ``lr_peak`` weight-decay sentinel.

Checking a recipe against this table is :mod:`hf_optim.runner.schema`'s job; this module only says what exists.
"""

from __future__ import annotations

from typing import Any

from mup_integration.vocabulary import WD_RULES

#: ``optimizer.weight_decay: lr_peak`` means λ = the peak lr of the chosen size (resolved by
#: :func:`hf_optim.runner.build.weight_decay`), so PaLM's ``lr_t²`` decay (mode ``corrected``) stays ``lr_t²`` when the lr is
#: overridden; a number copied from the peak lr would silently stop tracking it.
WEIGHT_DECAY_IS_LR_PEAK = "lr_peak"
#: Schema type of a field that takes a number or the :data:`WEIGHT_DECAY_IS_LR_PEAK` sentinel.
FLOAT_OR_LR_PEAK = "float_or_lr_peak"

SIZE_KEYS = {
    "lr": float,
    "batch_tokens": float,
    "total_tokens": float,
    "seq_len": int,
    "warmup_steps": int,
    "decay_steps": int,
    "floor": float,
}

#: Allowed keys per section; a type, a tuple of allowed strings, or a nested mapping. ``"any"`` = free mapping
#: (validated by its consumer, e.g. the optimizer class for ``optimizer.args``).
SCHEMA: dict[str, Any] = {
    "name": str,
    "title": str,
    "kind": ("published", "demo"),
    "base": str,
    "sources": list,
    "unknown": list,
    "assumptions": dict,
    "notes": list,
    # written by ``hf-optim mutransfer`` into tuned.yaml (proxy, grid, optimum, date); never read by training
    "provenance": "any",
    "optimizer": {
        "name": str,
        "lr": float,
        "betas": list,
        "eps": float,
        "eps_mode": ("torch", "tf"),
        "weight_decay": FLOAT_OR_LR_PEAK,
        "weight_decay_mode": ("l2", "coupled", "independent", "corrected"),
        "no_decay": list,
        "groups": list,
        "layer_decay": float,
        "args": "any",
    },
    "schedule": {
        "name": str,
        "warmup_steps": int,
        "warmup_tokens": float,
        "warmup_fraction": float,
        "floor": float,
        "decay_steps": int,
        "decay_tokens": float,
        "plateau_steps": int,
        "milestones": list,
        "factors": list,
        "phases": list,
        "scale": bool,
    },
    "training": {
        "max_grad_norm": float,
        "batch_tokens": float,
        "seq_len": int,
        "total_tokens": float,
        "total_steps": int,
    },
    "sizes": "sizes",
    "model": {
        "arch": ("llama", "gpt2"),
        "hidden_size": int,
        "num_layers": int,
        "num_heads": int,
        "intermediate_size": int,
        "tie_word_embeddings": bool,
        "mup": {
            "base_width": int,
            "wd_rule": WD_RULES,
            "zero_readout": bool,
            "zero_query": bool,
            "output_mult": float,
            "attn_mult": float,
            "base_depth": int,
            "depth_alpha": float,
        },
    },
    "data": {"corpus": str, "tokenizer": ("char", "byte"), "block_size": int, "val_fraction": float, "max_tokens": int},
    "run": {
        "max_steps": int,
        "batch_size": int,
        "grad_accum": int,
        "output_dir": str,
        "logging_steps": int,
        "save_steps": int,
        "eval_steps": int,
        "eval_batches": int,
        "seed": int,
        "size": str,
        "bf16": bool,
        "save_total_limit": int,
        "unfactored_fallback": bool,
        "threads": int,
    },
}

#: Every published recipe states these or lists them in ``unknown``.
PUBLISHED_FIELDS = (
    "optimizer.name",
    "optimizer.lr",
    "optimizer.weight_decay",
    "optimizer.weight_decay_mode",
    "optimizer.no_decay",
    "schedule.name",
    "schedule.warmup_steps",
    "training.max_grad_norm",
    "training.batch_tokens",
)
#: ... and, for optimizers that take ``betas`` / ``eps`` (the spec says), these (Adafactor states its moments in
#: ``optimizer.args``).
ADAM_FIELDS = ("optimizer.betas", "optimizer.eps")


def field_paths() -> list[str]:
    """All ``section.key`` paths (for ``unknown``/``assumptions`` entries and command-line overrides)."""
    paths: list[str] = []

    def walk(prefix: str, node: Any) -> None:
        for key, sub in node.items():
            path = f"{prefix}{key}"
            paths.append(path)
            if isinstance(sub, dict):
                walk(path + ".", sub)

    walk("", SCHEMA)
    return paths
