r"""Per-architecture pieces of muP surgery: one :class:`Adapter` per model family, one row per ``model_type``.

Surgery (:mod:`mup_integration.surgery`) is written once against this interface; a new architecture is one adapter
(usually a subclass overriding one or two methods) plus one row in :data:`ADAPTERS`. An adapter answers:

* ``attention_modules(model)``: the attention modules whose ``scaling`` attribute the surgery sets;
* ``sp_attention_scale(attn, config)``: the scale the module was built with (the SP value, recomputed so that
  re-applying the surgery is idempotent); the muP scale is this times :math:`\text{attn\_mult}\sqrt{d_0/d}`;
* ``hidden_init_std(name, sigma, config)``: the SP init std of a hidden matrix (muP divides it by
  :math:`\sqrt{\text{fan\_in\_mult}}`);
* ``vector_init(name, config)``: the init value of a vector parameter (norm weight 1, bias 0; Gemma's
  ``(1 + w)`` norms 0);
* ``zero_query(model)``: zero the query projection (``zero_query=True``);
* ``branch_outputs(model)``: per decoder layer, the modules whose *output* is the attention branch and the MLP
  branch just before the residual add (where a depth / residual multiplier acts and where export folds it);
* ``scale_query(attn, c)``: multiply the attention logits by :math:`c` through the weights (export folds the muP
  attention scale there: the query part of the projection, or the query norm when one follows it).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


class Adapter:
    """LLaMA module layout: ``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``, pre-norm residual blocks."""

    name = "llama"
    #: norms compute ``(offset + weight) * x_hat``: 0 in most families, 1 in Gemma's (weights initialised to 0)
    norm_offset = 0.0

    # ---- forward ------------------------------------------------------------------------------------------------
    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        return [m for m in model.modules()
                if type(m).__name__.endswith("Attention") and hasattr(m, "scaling") and hasattr(m, "head_dim")]

    def sp_attention_scale(self, attn: nn.Module, config: Any) -> float:
        return attn.head_dim ** -0.5

    # ---- initialisation -----------------------------------------------------------------------------------------
    def hidden_init_std(self, name: str, sigma: float, config: Any) -> float:
        return sigma

    def vector_init(self, name: str, config: Any) -> float:
        return 0.0 if name.endswith("bias") else 1.0 - self.norm_offset

    def zero_query(self, model: nn.Module) -> None:
        for module in model.modules():
            if isinstance(getattr(module, "q_proj", None), nn.Linear):
                module.q_proj.weight.zero_()
                if module.q_proj.bias is not None:
                    module.q_proj.bias.zero_()

    # ---- structure (depth multipliers, export) -------------------------------------------------------------------
    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    def branch_outputs(self, model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
        return [(layer.self_attn.o_proj, layer.mlp.down_proj) for layer in self.layers(model)]

    def scale_query(self, attn: nn.Module, factor: float) -> None:
        """Multiply every attention logit of ``attn`` by ``factor`` through its weights (export folds the muP
        attention scale this way). A norm applied to the query after the projection (Qwen3, OLMo-2, Gemma 3) would
        undo a scaled projection, so the factor goes into that norm's weight instead."""
        q_norm = getattr(attn, "q_norm", None)
        scale_output(q_norm if q_norm is not None else attn.q_proj, factor, self.norm_offset)


class GPT2Adapter(Adapter):
    """GPT-2: fused ``c_attn`` (Conv1D, weight (in, 3·embed)), ``c_proj`` branch outputs, tied ``wte``."""

    name = "gpt2"

    def sp_attention_scale(self, attn: nn.Module, config: Any) -> float:
        scaling = attn.head_dim ** -0.5 if getattr(attn, "scale_attn_weights", True) else 1.0
        if getattr(attn, "scale_attn_by_inverse_layer_idx", False):
            scaling /= float(attn.layer_idx + 1)
        return scaling

    def hidden_init_std(self, name: str, sigma: float, config: Any) -> float:
        # GPT-2's residual-branch scaling of the projections into the residual stream, as in HF's _init_weights
        return sigma / math.sqrt(2 * config.n_layer) if name.endswith("c_proj.weight") else sigma

    def zero_query(self, model: nn.Module) -> None:
        for module in model.modules():
            if hasattr(module, "c_attn") and hasattr(module, "embed_dim"):
                # Conv1D weight is (in, 3*embed): the first `embed_dim` output columns are the query.
                module.c_attn.weight[:, : module.embed_dim].zero_()
                module.c_attn.bias[: module.embed_dim].zero_()

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.transformer.h

    def branch_outputs(self, model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
        return [(block.attn.c_proj, block.mlp.c_proj) for block in self.layers(model)]

    @torch.no_grad()
    def scale_query(self, attn: nn.Module, factor: float) -> None:
        q = slice(0, attn.embed_dim)  # Conv1D weight (in, 3*embed): the query is the first embed_dim output columns
        attn.c_attn.weight[:, q] = attn.c_attn.weight[:, q].double() * factor
        attn.c_attn.bias[q] = attn.c_attn.bias[q].double() * factor


class OLMo2Adapter(Adapter):
    """OLMo-2: LLaMA layout with post-norms: each branch output goes through a norm before the residual add."""

    def branch_outputs(self, model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
        return [(layer.post_attention_layernorm, layer.post_feedforward_layernorm) for layer in self.layers(model)]


@torch.no_grad()
def scale_output(module: nn.Module, factor: float, norm_offset: float = 0.0) -> None:
    """Multiply ``module``'s output by ``factor`` through its parameters: a linear layer (weight and bias) or a norm
    (weight and bias; a norm computing ``(offset + w) * x_hat`` gets ``w' = factor * (offset + w) - offset``)."""
    weight, bias = module.weight, getattr(module, "bias", None)
    if weight.dim() == 1 and norm_offset:
        weight.copy_((weight.double() + norm_offset) * factor - norm_offset)
    else:
        weight.copy_(weight.double() * factor)  # in float64: one rounding to the parameter's dtype
    if bias is not None:
        bias.copy_(bias.double() * factor)


_LLAMA, _GPT2 = Adapter(), GPT2Adapter()

#: ``config.model_type`` -> adapter.
ADAPTERS: dict[str, Adapter] = {
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA, "olmo": _LLAMA, "olmo2": OLMo2Adapter(),
    "gpt2": _GPT2,
}


def adapter_for(config: Any) -> Adapter:
    """The adapter for ``config.model_type``; a ValueError naming the supported model types otherwise."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"muP surgery does not know model_type={model_type!r} ({type(config).__name__}). Supported: "
            f"{sorted(ADAPTERS)}. Other architectures need their own adapter (mup_integration/adapters.py)."
        )
    return ADAPTERS[model_type]
