r"""Export a muP model as a stock Hugging Face checkpoint that computes the same logits without this package.

A muP model's forward differs from its architecture's in multipliers only (see surgery.py): the readout input
multiplier :math:`\rho = \text{output\_mult}/m`, the attention scale :math:`s = s_{SP}\,\text{attn\_mult}
\sqrt{d_0/d}` and, with depth transfer, the residual-branch multiplier :math:`r` (``plan.residual_multiplier``).
Each is either a native config field of a stock architecture or linear in a weight it follows:

==============  ============================================  ==================================================
target          how the multipliers are carried                 ties
==============  ============================================  ==================================================
``granite``     ``logits_scaling`` :math:`=1/\rho`,              tied embeddings stay tied
                ``attention_multiplier`` :math:`=s`,
                ``residual_multiplier`` :math:`=r`,
                ``embedding_multiplier`` :math:`=1`
``llama``       folded into weights: ``lm_head`` :math:`\times\rho`,  a tied model is untied (the readout becomes
                query projection :math:`\times s/s_{SP}`,        :math:`\rho` times a copy of the embedding)
                ``o_proj`` and ``down_proj`` :math:`\times r`
``native``      the model's own architecture, folded as for        untied as for ``llama``
                ``llama`` through the family's adapter (query
                norm instead of the projection where one follows
                it; post-norms for the residual multiplier)
==============  ============================================  ==================================================

Folding is exact in exact arithmetic: :math:`W(\rho h) = (\rho W)h`; rotary embeddings and the key product are
linear in :math:`q`, so :math:`s\,q\cdot k = s_{SP}(c\,q)\cdot k` with :math:`c = s/s_{SP}`; RMSNorm output is linear in
its weight. ``granite`` and ``llama`` take the LLaMA-layout families without extra modules (``llama``, ``mistral``,
``qwen2``) and refuse what they cannot represent (a sliding window shorter than the context, query/key norms,
non-parametric or post-norms, another block layout), saying why.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .adapters import adapter_for
from .hooks import input_multiplier, set_input_multiplier
from .plan import MuPPlan, get_plan, unwrap
from .storage import clear_plan
from .surgery import is_mup_applied, is_tied

TARGETS = ("granite", "llama", "native")
#: families whose modules map one-to-one onto LLaMA's / Granite's; why the others do not
LLAMA_LAYOUT = ("llama", "mistral", "qwen2")
_WHY_NOT_LLAMA = {
    "qwen3": "it normalises queries and keys per head (q_norm/k_norm), which LLaMA and Granite do not have",
    "olmo2": "it normalises queries and keys (q_norm/k_norm) and puts the norms after each branch",
    "olmo": "its layer norms have no weights (non-parametric LayerNorm), not LLaMA's RMSNorm",
}
#: files of a checkpoint directory that describe tokenisation / generation and are copied unchanged
_SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
    "chat_template.jinja",
    "added_tokens.json",
)


def residual_multiplier(plan: MuPPlan) -> float:
    """The depth (residual-branch) multiplier of ``plan``; 1 for a width-only plan."""
    return float(getattr(plan, "residual_multiplier", 1.0))


def _check_model(model: nn.Module) -> MuPPlan:
    plan = get_plan(model)
    if not is_mup_applied(model):
        raise ValueError(
            "export_standard needs the muP forward changes in place (the model was loaded with a plain "
            "from_pretrained?): load it with mup_integration.load_mup_model(path) first."
        )
    return plan


def _check_llama_layout(model: nn.Module, to: str) -> None:
    config = model.config
    model_type = config.model_type
    if model_type not in LLAMA_LAYOUT:
        why = _WHY_NOT_LLAMA.get(model_type, f"its block layout is not LLaMA's ({type(model).__name__})")
        raise ValueError(
            f"export --to {to} cannot represent model_type={model_type!r}: {why}. Use --to native "
            "(the same architecture with the multipliers folded into its weights)."
        )
    window, context = getattr(config, "sliding_window", None), config.max_position_embeddings
    if window is not None and window < context:
        raise ValueError(
            f"export --to {to} cannot represent sliding-window attention (sliding_window={window} < "
            f"max_position_embeddings={context}): {to} attends to the whole context. Use --to native."
        )


def _llama_config_kwargs(model: nn.Module) -> dict[str, Any]:
    """The LLaMA-layout fields shared by LlamaConfig and GraniteConfig, read from a llama/mistral/qwen2 config."""
    c = model.config
    layer = model.model.layers[0]
    attn = [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj]
    mlp = [layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj]
    keys = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "hidden_act",
        "max_position_embeddings",
        "initializer_range",
        "rms_norm_eps",
        "rope_parameters",
        "attention_dropout",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
    )
    out = {k: copy.deepcopy(getattr(c, k)) for k in keys if hasattr(c, k)}
    out["attention_bias"] = any(m.bias is not None for m in attn)
    out["mlp_bias"] = any(m.bias is not None for m in mlp)
    out["tie_word_embeddings"] = is_tied(model)
    out["head_dim"] = layer.self_attn.head_dim
    return out


def _state_dict_with_zero_biases(model: nn.Module, target: nn.Module) -> dict[str, torch.Tensor]:
    """The source weights under the target's names; biases the target has and the source lacks (Qwen2's o_proj)
    are zeros, which is what the source computes."""
    source = model.state_dict()
    out = {}
    for name, value in target.state_dict().items():  # target: on the meta device
        if name in source:
            out[name] = source[name]
        elif name.endswith(".bias"):
            like = next(iter(source.values()))
            out[name] = torch.zeros(value.shape, dtype=like.dtype, device=like.device)
        else:
            raise ValueError(f"export: the target has a weight {name!r} the source model does not.")
    extra = sorted(set(source) - set(out))
    if extra:
        raise ValueError(f"export: the target architecture has no place for {extra[:3]} ({len(extra)} tensors).")
    return out


def _build(config: Any, state: dict[str, torch.Tensor], dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config).to(dtype)
    model.load_state_dict(state, strict=True)
    return model.eval()


def _fold(model: nn.Module, plan: MuPPlan) -> nn.Module:
    """A copy of ``model`` with every muP multiplier folded into its weights and the forward changes removed."""
    folded = copy.deepcopy(model)
    adapter = adapter_for(folded.config)
    with torch.no_grad():
        readout = folded.get_output_embeddings()
        rho = input_multiplier(readout)
        if is_tied(folded):  # untie first: the readout gets rho times a copy, the embedding keeps its weights
            readout.weight = nn.Parameter(readout.weight.detach().clone())
            folded.config.tie_word_embeddings = False
        readout.weight.copy_(readout.weight.double() * rho)
        set_input_multiplier(readout, None)
        adapter.fold_forward_changes(folded, plan)  # embedding normaliser, routers
        for attn in adapter.attention_modules(folded):
            sp = adapter.sp_attention_scale(attn, folded.config)
            adapter.scale_query(attn, attn.scaling / sp)
            attn.scaling = sp
        r = residual_multiplier(plan)
        if r != 1.0:
            for attn_out, mlp_out in adapter.branch_outputs(folded):
                adapter.scale_branch(attn_out, r)
                adapter.scale_branch(mlp_out, r)
    clear_plan(folded.config)
    return folded


def export_standard(model: nn.Module, to: str = "granite") -> nn.Module:
    """A stock-architecture model (``to`` in :data:`TARGETS`) computing the muP ``model``'s logits; no muP plan.

    The result is a new model (``model`` is not changed) in eval mode; ``save_pretrained`` it and load it anywhere.
    """
    if to not in TARGETS:
        raise ValueError(f"to must be one of {list(TARGETS)}, got {to!r}.")
    model = unwrap(model)
    plan = _check_model(model)
    dtype = next(model.parameters()).dtype
    if to == "native":
        folded = _fold(model, plan)
        return _build(copy.deepcopy(folded.config), folded.state_dict(), dtype)
    _check_llama_layout(model, to)
    kwargs = _llama_config_kwargs(model)
    if to == "llama":
        from transformers import LlamaConfig

        folded = _fold(model, plan)
        kwargs["tie_word_embeddings"] = False
        config = LlamaConfig(**kwargs)
        return _build(config, _state_dict_with_zero_biases(folded, _empty(config)), dtype)
    from transformers import GraniteConfig

    scalings = {a.scaling for a in adapter_for(model.config).attention_modules(model)}
    if len(scalings) != 1:
        raise ValueError(f"export --to granite needs one attention scale for all layers, got {sorted(scalings)}.")
    rho = input_multiplier(model.get_output_embeddings())
    config = GraniteConfig(
        **kwargs,
        attention_multiplier=scalings.pop(),
        embedding_multiplier=1.0,
        logits_scaling=1.0 / rho,
        residual_multiplier=residual_multiplier(plan),
    )
    return _build(config, _state_dict_with_zero_biases(model, _empty(config)), dtype)


def _empty(config: Any) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def describe(model: nn.Module, to: str) -> str:
    """One line saying what the export did with the multipliers and the tying."""
    tied = is_tied(unwrap(model))
    if to == "granite":
        return (
            "granite: the multipliers became GraniteConfig fields (logits_scaling, attention_multiplier, "
            f"residual_multiplier); embeddings {'stay tied' if tied else 'untied as in the source'}."
        )
    untie = "untied: lm_head = the readout multiplier x a copy of the embedding" if tied else "untied as in the source"
    return f"{to}: the multipliers were folded into lm_head, the query weights and the branch outputs; {untie}."


def _copy_side_files(src: str, dst: str) -> list[str]:
    copied = []
    for name in _SIDE_FILES:
        path = os.path.join(src, name)
        if os.path.isfile(path):
            shutil.copyfile(path, os.path.join(dst, name))
            copied.append(name)
    return copied


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hf-optim export",
        description="Write a muP checkpoint as a stock architecture that plain AutoModelForCausalLM.from_pretrained "
        "loads and that computes the same logits (docs/mup.md, 'Export for deployment').",
    )
    parser.add_argument("src", help="directory of a muP checkpoint (save_pretrained of a make_mup_model model)")
    parser.add_argument("dst", help="output directory (created; must not hold a checkpoint already)")
    parser.add_argument(
        "--to",
        choices=TARGETS,
        default="granite",
        help="granite: multipliers as config fields, ties kept; llama: folded into the weights "
        "(untied); native: the source architecture with the multipliers folded (default granite)",
    )
    args = parser.parse_args(argv)
    from .surgery import load_mup_model

    try:
        if not os.path.isdir(args.src):
            raise ValueError(f"SRC {args.src!r} is not a directory.")
        if os.path.exists(os.path.join(args.dst, "config.json")):
            raise ValueError(f"DST {args.dst!r} already holds a checkpoint (config.json); choose an empty directory.")
        model = load_mup_model(args.src)
        exported = export_standard(model, to=args.to)
    except (ValueError, OSError) as e:
        print(f"hf-optim export: {e}", file=sys.stderr)
        return 2
    os.makedirs(args.dst, exist_ok=True)
    exported.save_pretrained(args.dst)
    copied = _copy_side_files(args.src, args.dst)
    print(describe(model, args.to))
    print(f"wrote {args.dst} ({type(exported).__name__}{', copied ' + ', '.join(copied) if copied else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
