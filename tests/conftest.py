"""Shared fixtures: tiny models built from configs (never downloaded) and deterministic gradient streams."""

from __future__ import annotations

import os

import pytest
import torch

# Tests must never reach the network or a user's accelerate config.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)


def tiny_llama_config(hidden_size: int = 32, num_layers: int = 2, vocab_size: int = 64, **overrides):
    from transformers import LlamaConfig

    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_gpt2_config(n_embd: int = 32, n_layer: int = 2, vocab_size: int = 64, **overrides):
    from transformers import GPT2Config

    kwargs = dict(vocab_size=vocab_size, n_embd=n_embd, n_layer=n_layer, n_head=4, n_positions=64)
    kwargs.update(overrides)
    return GPT2Config(**kwargs)


@pytest.fixture
def tiny_llama():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config())
