"""The model ``hf-optim train`` builds from a recipe's ``model:`` section: a LLaMA or GPT-2 causal LM from config
(never downloaded), a muP one when ``model.mup.base_width`` is set, and the section's defaults."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

MODEL_DEFAULTS = {
    "arch": "llama",
    "hidden_size": 64,
    "num_layers": 2,
    "num_heads": 4,
    "intermediate_size": None,
    "tie_word_embeddings": False,
    "mup": None,
}


def build_model(model_cfg: Mapping[str, Any], vocab_size: int, block_size: int):
    """A LLaMA or GPT-2 causal LM from config; with ``mup.base_width`` a muP model (plan in ``config.hf_optim_mup``)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    width, layers, heads = model_cfg["hidden_size"], model_cfg["num_layers"], model_cfg["num_heads"]
    for key in ("hidden_size", "num_layers", "num_heads"):
        if isinstance(model_cfg[key], bool) or not isinstance(model_cfg[key], int) or model_cfg[key] < 1:
            raise ValueError(f"model.{key} must be an integer >= 1, got {model_cfg[key]!r}.")
    if width % heads:
        # Checked here: transformers' own check raises a huggingface_hub error that is not a ValueError.
        raise ValueError(
            f"model.hidden_size={width} must be a multiple of model.num_heads={heads} "
            f"(each head gets hidden_size / num_heads dimensions)."
        )
    if model_cfg["arch"] == "llama":
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=width,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            intermediate_size=model_cfg["intermediate_size"] or 4 * width,
            max_position_embeddings=block_size,
            tie_word_embeddings=model_cfg["tie_word_embeddings"],
            use_cache=False,
        )
        model_cls = LlamaForCausalLM
    else:
        config = GPT2Config(
            vocab_size=vocab_size,
            n_embd=width,
            n_layer=layers,
            n_head=heads,
            n_positions=block_size,
            n_inner=model_cfg["intermediate_size"],
            tie_word_embeddings=model_cfg["tie_word_embeddings"],
            use_cache=False,
        )
        model_cls = GPT2LMHeadModel
    mup = model_cfg.get("mup") or {}
    if not mup.get("base_width"):
        return model_cls(config)
    from mup_integration.surgery import make_mup_model

    # base_depth + depth_alpha (both or neither, checked by make_plan): depth scaling, see mup_integration.depth
    plan_kwargs = {
        k: mup[k]
        for k in ("zero_readout", "zero_query", "output_mult", "attn_mult", "base_depth", "depth_alpha")
        if mup.get(k) is not None
    }
    return make_mup_model(config, base_width=mup["base_width"], model_cls=model_cls, **plan_kwargs)
