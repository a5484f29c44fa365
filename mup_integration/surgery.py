r"""Model surgery: turn a Hugging Face causal LM into its muP version, in place, keeping every parameter name.

Three changes, with :math:`m` = hidden size / base hidden size, :math:`d` the head dim, :math:`d_0` the base head dim
and :math:`\sigma` = ``config.initializer_range``:

1. **Readout multiplier** (forward, every load): the output layer sees :math:`x \cdot \text{output\_mult} / m`
   (a forward pre-hook on ``get_output_embeddings()``, so tied and untied heads keep their names and tying). Unlike
   ``mup.MuSharedReadout`` no :math:`\sqrt{m}` rescale of the tied weight is applied: the embedding keeps its init.
2. **Attention scale** (forward, every load): :math:`\text{scaling} = s_{SP}\cdot \text{attn\_mult}\cdot
   \sqrt{d_0/d}`, i.e. :math:`\text{attn\_mult}\cdot\sqrt{d_0}/d` for LLaMA (:math:`s_{SP} = d^{-1/2}`): the
   :math:`1/d` scaling of muP, anchored so that the base model keeps its standard :math:`1/\sqrt{d_0}`. GPT-2's
   ``scale_attn_weights=False`` (:math:`s_{SP}=1`) and ``scale_attn_by_inverse_layer_idx`` (:math:`s_{SP}` divided
   by layer+1) are kept as factors.
3. **muP initialisation** (construction only, never on load): hidden matrices :math:`\mathcal N(0,
   \sigma_\ell^2/\text{fan\_in\_mult})` where :math:`\sigma_\ell` is the SP std of that layer (:math:`\sigma`, or
   GPT-2's :math:`\sigma/\sqrt{2L}` for ``c_proj``); embeddings and readout :math:`\mathcal N(0, \sigma^2)` (readout
   optionally zero); norm weights 1, biases 0; the query projection optionally zero. At :math:`m = 1` this is the
   model's standard initialisation.
4. **Residual-branch multiplier** (forward, every load; only with depth scaling): each attention and MLP branch
   output is multiplied by :math:`(L/L_0)^{-\alpha}` before the residual add (a forward hook on ``o_proj`` /
   ``down_proj``, GPT-2's ``c_proj`` of attention and MLP, OLMo-2's post-branch norms; see
   :mod:`mup_integration.depth`). GPT-2's ``c_proj`` init keeps the *base* depth's :math:`\sigma/\sqrt{2L_0}`.

Supported: the model types of :data:`mup_integration.adapters.ADAPTERS` (LLaMA layout: Llama, Mistral, Qwen2,
Qwen3, OLMo, OLMo-2; GPT-2; Gemma 1/2/3; Phi-3; GPT-NeoX; Mixtral, Qwen3-MoE, OLMoE); the per-family pieces are
there. References: Yang et al., "Tensor Programs V" (2022), Table 3 and Appendix J (attention).
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Any

import torch
from torch import nn

from .adapters import ADAPTERS, Adapter, adapter_for
from .depth import apply_branch_multipliers, at_base_depth, branch_multipliers_ok
from .hooks import input_multiplier, set_input_multiplier
from .plan import MuPPlan, ParamInfo, get_plan, has_plan, make_plan, unwrap
from .storage import adopt_upstream, store_plan_dict, stored_plan_dict, upstream_claim

#: ``config.model_type`` -> adapter name (kept for callers of the old table; the adapters are in adapters.py).
SUPPORTED_MODEL_TYPES: dict[str, str] = {model_type: a.name for model_type, a in ADAPTERS.items()}


def check_supported_config(config: Any) -> Adapter:
    """The adapter for ``config``; a ValueError naming the supported model types otherwise."""
    return adapter_for(config)


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    return adapter_for(model.config).attention_modules(model)


def attention_scale(attn: nn.Module, plan: MuPPlan, config: Any) -> float:
    r""":math:`s_{SP}\cdot\text{attn\_mult}\cdot\sqrt{d_0/d}`, :math:`s_{SP}` the adapter's SP scale."""
    adapter = adapter_for(config)
    sp = adapter.sp_attention_scale(attn, config)
    return sp * plan.attn_mult * math.sqrt(plan.base_head_dim / adapter.head_dim(attn))


#: ``mup``'s readout classes: ``nn.Linear`` subclasses whose forward already divides by ``width_mult``.
_MUP_READOUTS = ("MuReadout", "MuSharedReadout")


def _readout(model: nn.Module) -> nn.Module:
    readout = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(readout, nn.Linear):
        raise ValueError(f"{type(model).__name__} has no nn.Linear output embedding (lm_head); muP surgery needs one.")
    if type(readout).__name__ in _MUP_READOUTS:
        raise ValueError(
            f"{type(model).__name__}'s output layer is mup's {type(readout).__name__}, which already applies the "
            "1/width_mult readout multiplier; this surgery would apply it a second time. For a model prepared "
            "with mup.set_base_shapes, take only the plan (mup_integration.plan_from_infshapes(model)) and pass it "
            "to param_overrides(model, plan=plan); or build the model with a plain nn.Linear head and use "
            "make_mup_model / apply_mup."
        )
    return readout


def is_tied(model: nn.Module) -> bool:
    model = unwrap(model)
    return _readout(model).weight is model.get_input_embeddings().weight


def apply_mup(model: nn.Module, plan: MuPPlan | None = None, *, init: bool = True) -> nn.Module:
    """Apply ``plan`` (default: the one in the model's config) to ``model`` in place and record it in the config
    (``config.hf_optim_mup``; an old ``config.mup`` dict moves there, see storage.py).

    ``init=True`` re-initialises every parameter the muP way: use it only on a freshly constructed model (or after
    ``to_empty``). ``init=False`` only sets the forward changes (attention scale, readout multiplier): use it after
    loading weights. Idempotent: applying twice gives the same model.
    """
    inner = unwrap(model)
    adapter = check_supported_config(inner.config)
    stored_plan_dict(inner.config)  # refuses upstream transformers' muP switch before anything changes
    plan = plan if plan is not None else get_plan(inner)
    matched = plan.match(inner.named_parameters())  # raises if the plan was made for another model
    attns = adapter.attention_modules(inner)
    if not attns:
        raise ValueError(
            f"{type(inner).__name__}: no attention module with `scaling` and `head_dim` attributes "
            f"found; it does not have the {adapter.name!r} layout muP surgery expects."
        )
    for attn in attns:
        if adapter.head_dim(attn) != plan.head_dim:
            raise ValueError(
                f"The plan is for head_dim={plan.head_dim} but the model's attention has head_dim="
                f"{adapter.head_dim(attn)}; rebuild the plan for this config."
            )
        attn.scaling = attention_scale(attn, plan, inner.config)
    set_input_multiplier(_readout(inner), plan.output_mult / plan.width_mult)
    adapter.apply_forward_changes(inner, plan)
    apply_branch_multipliers(inner, adapter, plan)  # depth scaling: m_L^-alpha on each branch (none when it is 1)
    store_plan_dict(inner.config, plan.to_dict())
    if init:
        init_weights(inner, plan, _matched=matched)
    return model


def is_mup_applied(model: nn.Module) -> bool:
    """Whether the forward changes of the model's plan are in place (e.g. False after a plain ``from_pretrained``)."""
    inner = unwrap(model)
    if not has_plan(inner):
        return False
    plan = get_plan(inner)
    adapter = adapter_for(inner.config)
    readout = input_multiplier(_readout(inner))
    return (
        readout is not None
        and math.isclose(readout, plan.output_mult / plan.width_mult, rel_tol=1e-12)
        and all(
            math.isclose(a.scaling, attention_scale(a, plan, inner.config), rel_tol=1e-12)
            for a in adapter.attention_modules(inner)
        )
        and adapter.forward_changes_applied(inner, plan)
        and branch_multipliers_ok(inner, adapter, plan)
    )


@torch.no_grad()
def init_weights(model: nn.Module, plan: MuPPlan | None = None, *, _matched: list | None = None) -> None:
    """muP initialisation of every parameter (see the module docstring); uses the global torch RNG."""
    inner = unwrap(model)
    adapter = check_supported_config(inner.config)
    plan = plan if plan is not None else get_plan(inner)
    matched = _matched if _matched is not None else plan.match(inner.named_parameters())
    config = inner.config
    sigma = float(config.initializer_range)
    if plan.zero_readout and is_tied(inner):
        raise ValueError(
            "zero_readout=True needs untied embeddings (tie_word_embeddings=False): zeroing a tied "
            "readout would zero the input embedding too."
        )
    for name, p, info in matched:
        _init_param(name, p, info, sigma, adapter, config, plan)
    if plan.zero_query:
        adapter.zero_query(inner)
    adapter.apply_forward_changes(inner, plan)  # buffers (Gemma's embedding scale) hold garbage after to_empty


def _init_param(
    name: str, p: torch.Tensor, info: ParamInfo, sigma: float, adapter: Adapter, config: Any, plan: MuPPlan
) -> None:
    if info.kind == "hidden":
        # under depth scaling the branch multiplier carries the depth dependence: SP stds of the base depth
        # (GPT-2's c_proj sigma/sqrt(2 L0)), so deeper models are not shrunk a second time
        p.normal_(0.0, adapter.hidden_init_std(name, sigma, at_base_depth(config, plan)) / math.sqrt(info.fan_in_mult))
    elif info.kind == "embedding":
        p.normal_(0.0, sigma)
    elif info.kind == "readout":
        p.zero_() if plan.zero_readout else p.normal_(0.0, sigma)
    else:  # biases, norm weights
        p.fill_(adapter.vector_init(name, config))


def make_mup_model(
    config: Any,
    base_config: Any | None = None,
    *,
    base_width: int | None = None,
    model_cls: Any | None = None,
    device: str | torch.device | None = None,
    **plan_kwargs: Any,
) -> nn.Module:
    """Build a muP model from ``config``: plan (on meta), construct, apply surgery and muP init.

    ``device="meta"`` builds without memory and skips the init: call ``model.to_empty(device=...)`` then
    :func:`init_weights(model) <init_weights>`. ``plan_kwargs`` go to :func:`~mup_integration.plan.make_plan`
    (``base_head_dim``, ``base_intermediate_size``, ``output_mult``, ``attn_mult``, ``zero_readout``,
    ``zero_query``, ``base_depth`` and ``depth_alpha`` for depth scaling).
    """
    config = copy.deepcopy(config)
    if upstream_claim(config):  # a fresh build: adopt upstream's mup_base_width, drop its fields (storage.py)
        adopted = adopt_upstream(config, base_width if base_config is None else base_config.hidden_size)
        base_width = adopted if base_config is None else None
    plan = make_plan(config, base_config, base_width=base_width, model_cls=model_cls, **plan_kwargs)
    store_plan_dict(config, plan.to_dict())
    with torch.device(device) if device is not None else contextlib.nullcontext():
        if model_cls is None:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_config(config)
        else:
            model = model_cls(config)
    return apply_mup(model, plan, init=str(device) != "meta")


def from_pretrained(model_cls: Any, path: str, **kwargs: Any) -> nn.Module:
    """``model_cls.from_pretrained(path, **kwargs)`` then re-apply the stored plan's forward changes (no re-init)."""
    model = model_cls.from_pretrained(path, **kwargs)
    if not has_plan(model):
        raise ValueError(
            f"The model at {path!r} has no muP plan in its config (config.hf_optim_mup); load it with "
            f"{getattr(model_cls, '__name__', model_cls)}.from_pretrained instead."
        )
    return apply_mup(model, init=False)


def load_mup_model(path: str, **kwargs: Any) -> nn.Module:
    """:func:`from_pretrained` with ``AutoModelForCausalLM``."""
    from transformers import AutoModelForCausalLM

    return from_pretrained(AutoModelForCausalLM, path, **kwargs)
