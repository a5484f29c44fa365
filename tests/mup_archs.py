"""The architecture table of the muP tests: one tiny config per supported family beyond LLaMA / GPT-2, and a
builder. Shared by test_mup_architectures.py and test_mup_export.py (a plain module, so that neither test module
imports the other)."""

from __future__ import annotations

import torch

import mup_integration as mi

VOCAB = 64


def _common(width: int) -> dict:
    return {
        "vocab_size": VOCAB,
        "hidden_size": width,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 64,
    }


def gemma(w):
    from transformers import GemmaConfig

    return GemmaConfig(**_common(w), intermediate_size=2 * w, num_key_value_heads=2, head_dim=w // 4)


def gemma2(w):
    from transformers import Gemma2Config

    return Gemma2Config(
        **_common(w),
        intermediate_size=2 * w,
        num_key_value_heads=2,
        head_dim=w // 4,
        query_pre_attn_scalar=64,
        sliding_window=16,
    )


def gemma3_text(w):
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        **_common(w),
        intermediate_size=2 * w,
        num_key_value_heads=2,
        head_dim=w // 4,
        query_pre_attn_scalar=64,
        sliding_window=16,
    )


def phi3(w):
    from transformers import Phi3Config

    return Phi3Config(
        **_common(w), intermediate_size=2 * w, num_key_value_heads=2, pad_token_id=0, bos_token_id=0, eos_token_id=0
    )


def gpt_neox(w):
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        **_common(w), intermediate_size=2 * w, bos_token_id=0, eos_token_id=0, hidden_dropout=0.0, attention_dropout=0.0
    )


def mixtral(w):
    from transformers import MixtralConfig

    return MixtralConfig(
        **_common(w), intermediate_size=2 * w, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2
    )


def qwen3_moe(w):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        **_common(w),
        intermediate_size=2 * w,
        moe_intermediate_size=w,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        head_dim=w // 4,
    )


def olmoe(w):
    from transformers import OlmoeConfig

    return OlmoeConfig(
        **_common(w),
        intermediate_size=2 * w,
        num_experts=4,
        num_experts_per_tok=2,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
    )


# name -> (config factory, SP attention scale at width 128, family notes checked below)
ARCHS = {
    "gemma": (gemma, 32**-0.5),
    "gemma2": (gemma2, 64**-0.5),  # query_pre_attn_scalar
    "gemma3_text": (gemma3_text, 64**-0.5),
    "phi3": (phi3, 32**-0.5),
    "gpt_neox": (gpt_neox, 32**-0.5),
    "mixtral": (mixtral, 32**-0.5),
    "qwen3_moe": (qwen3_moe, 32**-0.5),
    "olmoe": (olmoe, 32**-0.5),
}
MOE = ("mixtral", "qwen3_moe", "olmoe")
GEMMA = ("gemma", "gemma2", "gemma3_text")


def build(arch: str, width: int = 128, seed: int = 0, tied: bool | None = None, **kw):
    cfg = ARCHS[arch][0](width)
    cfg._attn_implementation = "eager"
    if tied is not None:
        cfg.tie_word_embeddings = tied
    torch.manual_seed(seed)
    return mi.make_mup_model(cfg, base_width=32, **kw)
