"""What the width and depth coordinate checks feed their models: a small config per family and fixed text batches."""

from __future__ import annotations

from importlib import resources
from typing import Any

import torch


def _config(model: str, width: int, num_layers: int, vocab_size: int, seq_len: int) -> Any:
    if model == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=seq_len,
            tie_word_embeddings=False,
        )
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=vocab_size,
        n_embd=width,
        n_layer=num_layers,
        n_head=4,
        n_positions=seq_len,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )


def _batches(vocab_size: int, batch_size: int, seq_len: int, steps: int) -> list[torch.Tensor]:
    """Consecutive byte-level chunks of the bundled Tiny Shakespeare (the same text for every width)."""
    text = resources.files("hf_optim").joinpath("data/tinyshakespeare.txt").read_bytes()
    need = steps * batch_size * seq_len
    data = torch.tensor(list(text[:need]), dtype=torch.long) % vocab_size
    return list(data.view(steps, batch_size, seq_len))
