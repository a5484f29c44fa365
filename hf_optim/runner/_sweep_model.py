r"""The HF model behind a sweep cell's settings, and the horizon fitted to its size.

:func:`model_config` turns :class:`~._sweep_settings.ModelSettings` into a ``LlamaConfig`` or ``Olmo2Config``;
:func:`parameter_count` counts that model's parameters without allocating them (built on the meta device);
:func:`fit_horizon` sets a cell's step counts from ``train.tokens_per_param`` and ``train.warmup_fraction``:

.. math:: T = \left\lceil \frac{\rho \, N}{B\,S} \right\rceil, \qquad W = \operatorname{round}(f_w T)

(:math:`\rho` characters per parameter, :math:`N` parameters, :math:`B\,S` characters per step). Scaling studies
compare models at a fixed number of tokens per parameter (Hoffmann et al. 2022's compute-optimal ≈ 20), so that a
larger model is not judged at a smaller share of its own training budget. Here a token is one character.
"""

from __future__ import annotations

import math
from dataclasses import replace
from functools import cache

from ._sweep_data import vocab_size
from ._sweep_settings import ModelSettings, TrainSettings


def model_config(model: ModelSettings, width: int):
    """A ``LlamaConfig`` or ``Olmo2Config`` for ``model`` at ``width`` (built locally: nothing is downloaded).

    OLMo-2 differs from LLaMA by normalising q and k (QK-norm over the whole projection) and each block's *output*
    (``post_attention_layernorm`` / ``post_feedforward_layernorm`` before the residual add, no pre-norm): the
    function no longer depends on the norms of W_q, W_k, of the product W_o·W_v or of W_down·W_up, which is the
    scale-invariant setting of the rotational-equilibrium analysis of decoupled weight decay.
    """
    from transformers import LlamaConfig, Olmo2Config

    heads = width // model.head_dim
    common = dict(
        vocab_size=vocab_size(),
        hidden_size=width,
        intermediate_size=model.ffn_mult * width,
        num_hidden_layers=model.layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=model.seq_len,
        tie_word_embeddings=False,
        initializer_range=model.init_std,
    )
    if model.norm_eps is not None:
        common["rms_norm_eps"] = model.norm_eps
    if model.arch == "llama":
        return LlamaConfig(**common)
    # OLMo-2's default special tokens (pad 1, eos 50279) belong to its 100k vocabulary; the character vocabulary
    # has none, and generation is never used here.
    return Olmo2Config(**common, pad_token_id=None, bos_token_id=None, eos_token_id=None)


def model_class(arch: str):
    from transformers import LlamaForCausalLM, Olmo2ForCausalLM

    return {"llama": LlamaForCausalLM, "olmo2": Olmo2ForCausalLM}[arch]


@cache
def parameter_count(model: ModelSettings, width: int) -> int:
    """Parameters of the HF model at ``width``: embedding, blocks, final norm and readout (untied). muP's surgery
    adds none, so this is every parametrization's count."""
    import torch

    with torch.device("meta"):
        built = model_class(model.arch)(model_config(model, width))
    return sum(p.numel() for p in built.parameters())


def fit_horizon(train: TrainSettings, model: ModelSettings, width: int) -> TrainSettings:
    """``train`` with ``steps`` set from ``tokens_per_param`` and ``warmup_steps`` from ``warmup_fraction`` (each
    only when given; otherwise ``train`` is returned unchanged)."""
    steps = train.steps
    if train.tokens_per_param is not None:
        chars = train.tokens_per_param * parameter_count(model, width)
        steps = max(1, math.ceil(chars / (model.batch_size * model.seq_len)))
    warmup = train.warmup_steps if train.warmup_fraction is None else round(train.warmup_fraction * steps)
    return replace(train, steps=steps, warmup_steps=warmup)
