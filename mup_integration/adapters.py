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

from .hooks import input_multiplier, set_input_multiplier


class Adapter:
    """LLaMA module layout: ``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``, pre-norm residual blocks."""

    name = "llama"
    #: norms compute ``(offset + weight) * x_hat``: 0 in most families, 1 in Gemma's (weights initialised to 0)
    norm_offset = 0.0

    # ---- forward ------------------------------------------------------------------------------------------------
    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        return [
            m
            for m in model.modules()
            if type(m).__name__.endswith("Attention") and hasattr(m, "scaling") and hasattr(m, "head_dim")
        ]

    def sp_attention_scale(self, attn: nn.Module, config: Any) -> float:
        return attn.head_dim**-0.5

    def head_dim(self, attn: nn.Module) -> int:
        return attn.head_dim

    def apply_forward_changes(self, model: nn.Module, plan: Any) -> None:
        """Family-specific forward multipliers beyond the readout and attention scale (embedding normaliser,
        routers); re-applied on every load, so they must be idempotent."""

    def forward_changes_applied(self, model: nn.Module, plan: Any) -> bool:
        return True

    def fold_forward_changes(self, model: nn.Module, plan: Any) -> None:
        """Fold :meth:`apply_forward_changes` into the weights and restore the stock forward (export)."""

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

    def scale_branch(self, module: nn.Module, factor: float) -> None:
        """Multiply the output of a module from :meth:`branch_outputs` by ``factor`` through its weights."""
        scale_output(module, factor, self.norm_offset)


class GPT2Adapter(Adapter):
    """GPT-2: fused ``c_attn`` (Conv1D, weight (in, 3·embed)), ``c_proj`` branch outputs, tied ``wte``."""

    name = "gpt2"

    def sp_attention_scale(self, attn: nn.Module, config: Any) -> float:
        scaling = attn.head_dim**-0.5 if getattr(attn, "scale_attn_weights", True) else 1.0
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


class GemmaAdapter(Adapter):
    r"""Gemma / Gemma 2 / Gemma 3 text: LLaMA layout with ``(1 + w)`` RMSNorms (weights initialised to 0) and an
    embedding normaliser :math:`\sqrt{d}` (``embed_tokens.embed_scale``, a non-persistent buffer).

    muP rule for the normaliser: anchored at the base like the attention scale, :math:`\sqrt{d} \to \sqrt{d_0} =
    \sqrt{d/m}`, so embedding activations keep the base model's size at every width (an embedding is an input
    layer: its output coordinates must be :math:`\Theta(1)` in width, Tensor Programs V Table 3). Gemma 2/3 (with
    ``post_norms``): the SP attention scale is ``query_pre_attn_scalar ** -0.5``; each branch ends in a post-norm.
    """

    name = "gemma"
    norm_offset = 1.0

    def __init__(self, post_norms: bool) -> None:
        self.post_norms = post_norms

    def sp_attention_scale(self, attn: nn.Module, config: Any) -> float:
        scalar = getattr(config, "query_pre_attn_scalar", None)
        return scalar**-0.5 if scalar else attn.head_dim**-0.5

    def branch_outputs(self, model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
        if not self.post_norms:
            return super().branch_outputs(model)
        return [(layer.post_attention_layernorm, layer.post_feedforward_layernorm) for layer in self.layers(model)]

    @staticmethod
    def _embedding_scales(model: nn.Module, plan: Any) -> tuple[nn.Module, float, float]:
        embed = model.get_input_embeddings()
        sp = float(model.config.hidden_size) ** 0.5
        return embed, sp, sp / math.sqrt(plan.width_mult)

    @torch.no_grad()
    def apply_forward_changes(self, model: nn.Module, plan: Any) -> None:
        embed, _, mup = self._embedding_scales(model, plan)
        embed.scalar_embed_scale = mup  # transformers' _init_weights re-fills the buffer from this attribute
        embed.embed_scale.fill_(mup)

    def forward_changes_applied(self, model: nn.Module, plan: Any) -> bool:
        embed, _, mup = self._embedding_scales(model, plan)
        return math.isclose(float(embed.embed_scale), mup, rel_tol=1e-6)

    @torch.no_grad()
    def fold_forward_changes(self, model: nn.Module, plan: Any) -> None:
        embed, sp, mup = self._embedding_scales(model, plan)
        embed.weight.copy_(embed.weight.double() * (mup / sp))
        embed.scalar_embed_scale = sp
        embed.embed_scale.fill_(sp)


class Phi3Adapter(Adapter):
    """Phi-3: fused ``qkv_proj`` (rows: all query heads, then keys, then values) and fused ``gate_up_proj``.

    A fused projection is one hidden matrix (fan-in and fan-out grow with width): the same rule as separate
    q/k/v (Tensor Programs V treats each output block alike; fusing only concatenates rows)."""

    name = "phi3"

    @staticmethod
    def _query_rows(attn: nn.Module) -> slice:
        return slice(0, attn.config.num_attention_heads * attn.head_dim)

    def zero_query(self, model: nn.Module) -> None:
        for attn in self.attention_modules(model):
            attn.qkv_proj.weight[self._query_rows(attn)] = 0.0

    @torch.no_grad()
    def scale_query(self, attn: nn.Module, factor: float) -> None:
        q = self._query_rows(attn)
        attn.qkv_proj.weight[q] = attn.qkv_proj.weight[q].double() * factor


class GPTNeoXAdapter(Adapter):
    """GPT-NeoX (Pythia): fused ``query_key_value`` laid out per head as [q_h, k_h, v_h] (each ``head_size``
    rows), ``attention.dense`` and ``mlp.dense_4h_to_h`` branch outputs (also with ``use_parallel_residual``),
    LayerNorms with bias, untied ``embed_in`` / ``embed_out``."""

    name = "gpt_neox"

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        return [m for m in model.modules() if type(m).__name__ == "GPTNeoXAttention"]

    def sp_attention_scale(self, attn: nn.Module, config: Any) -> float:
        return attn.head_size**-0.5

    def head_dim(self, attn: nn.Module) -> int:
        return attn.head_size

    @staticmethod
    def _query_rows(attn: nn.Module) -> torch.Tensor:
        d, n = attn.head_size, attn.query_key_value.weight.shape[0] // (3 * attn.head_size)
        return torch.cat([torch.arange(h * 3 * d, h * 3 * d + d) for h in range(n)])

    def zero_query(self, model: nn.Module) -> None:
        for attn in self.attention_modules(model):
            rows = self._query_rows(attn)
            attn.query_key_value.weight[rows] = 0.0
            if attn.query_key_value.bias is not None:
                attn.query_key_value.bias[rows] = 0.0

    @torch.no_grad()
    def scale_query(self, attn: nn.Module, factor: float) -> None:
        rows, qkv = self._query_rows(attn), attn.query_key_value
        qkv.weight[rows] = (qkv.weight[rows].double() * factor).to(qkv.weight.dtype)
        if qkv.bias is not None:
            qkv.bias[rows] = (qkv.bias[rows].double() * factor).to(qkv.bias.dtype)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.gpt_neox.layers

    def branch_outputs(self, model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
        return [(layer.attention.dense, layer.mlp.dense_4h_to_h) for layer in self.layers(model)]


class MoEAdapter(Adapter):
    r"""Mixture-of-experts with the LLaMA attention (Mixtral, Qwen3-MoE, OLMoE): ``mlp.gate`` (router, weight (E, d))
    and ``mlp.experts`` (``gate_up_proj`` (E, 2I, d), ``down_proj`` (E, d, I), applied with ``F.linear`` per expert).

    Rules: each expert matrix is a hidden matrix (fan-in and fan-out grow with width; the expert count E does not),
    so it gets the hidden rules per expert. The router has a finite fan-out E: it is an *output* layer like
    ``lm_head`` (plan kind ``readout``), so its input is multiplied by :math:`1/m` (forward pre-hook, the readout
    multiplier of Tensor Programs V Table 3 without ``output_mult``), it is initialised :math:`\mathcal N(0,
    \sigma^2)` and its Adam lr is not scaled: router logits stay :math:`\Theta(1)` after training at every width.
    """

    name = "moe"

    def routers(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return [(f"{name}.weight", m) for name, m in model.named_modules() if type(m).__name__.endswith("TopKRouter")]

    def _router_multipliers(self, model: nn.Module, plan: Any) -> list[tuple[nn.Module, float]]:
        return [(m, 1.0 / plan.params[name].width_mult) for name, m in self.routers(model)]

    def apply_forward_changes(self, model: nn.Module, plan: Any) -> None:
        for router, mult in self._router_multipliers(model, plan):
            set_input_multiplier(router, mult)

    def forward_changes_applied(self, model: nn.Module, plan: Any) -> bool:
        return all(
            input_multiplier(r) is not None and math.isclose(input_multiplier(r), mult, rel_tol=1e-12)
            for r, mult in self._router_multipliers(model, plan)
        )

    @torch.no_grad()
    def fold_forward_changes(self, model: nn.Module, plan: Any) -> None:
        for router, mult in self._router_multipliers(model, plan):
            router.weight.copy_(router.weight.double() * mult)
            set_input_multiplier(router, None)

    def scale_branch(self, module: nn.Module, factor: float) -> None:
        experts = getattr(module, "experts", None)
        if experts is None:  # a dense layer of a partly dense MoE (Qwen3-MoE mlp_only_layers)
            return super().scale_branch(module, factor)
        with torch.no_grad():
            experts.down_proj.copy_(experts.down_proj.double() * factor)

    def branch_outputs(self, model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
        return [
            (layer.self_attn.o_proj, getattr(layer.mlp, "down_proj", None) or layer.mlp) for layer in self.layers(model)
        ]


_LLAMA, _GPT2 = Adapter(), GPT2Adapter()

#: ``config.model_type`` -> adapter.
ADAPTERS: dict[str, Adapter] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "olmo": _LLAMA,
    "olmo2": OLMo2Adapter(),
    "gpt2": _GPT2,
    "gemma": GemmaAdapter(post_norms=False),
    "gemma2": GemmaAdapter(post_norms=True),
    "gemma3_text": GemmaAdapter(post_norms=True),
    "phi3": Phi3Adapter(),
    "gpt_neox": GPTNeoXAdapter(),
    "mixtral": MoEAdapter(),
    "qwen3_moe": MoEAdapter(),
    "olmoe": MoEAdapter(),
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
