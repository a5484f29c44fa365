r"""The muP plan: for every parameter *name*, its kind and width multipliers, as plain JSON-able data.

A plan is computed from the target config and a base config by building both models on the ``meta`` device (no
memory, no initialisation) and comparing parameter shapes, as ``mup.set_base_shapes`` does, but keyed by name and
stored in the model's config instead of as attributes on Parameters. Names survive ``copy.deepcopy``, meta-device
construction + ``to_empty``, ``load_state_dict(assign=True)`` and FSDP2's ``fully_shard``; the prefixes that DDP
(``module.``) and ``torch.compile`` (``_orig_mod.``) add are stripped when a name is looked up.

Kinds (a dimension is a *width* dimension when it grows with the hidden size):

=============  =====================================  ============================================================
kind           width dimensions                        examples
=============  =====================================  ============================================================
``hidden``     fan-in and fan-out                      ``q_proj``, ``o_proj``, ``up_proj``, GPT-2 ``c_attn``
``embedding``  fan-out only (input layer)              ``embed_tokens``, ``wte``, ``wpe``
``readout``    fan-in only (output layer)              untied ``lm_head``
``vector``     at most one (biases, norm weights)      ``input_layernorm.weight``, ``c_attn.bias``
=============  =====================================  ============================================================

With :math:`n` a dimension of the target and :math:`n_0` its size in the base model, the dimension's multiplier is
:math:`n/n_0` (1 for a non-width dimension). ``width_mult`` follows ``mup``: the fan-in multiplier for ``hidden`` and
``readout`` weights, the fan-out (width) multiplier for ``embedding`` and ``vector`` parameters.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from hf_optim import _validation as v

from ._base_config import config_head_dim, config_hidden_size, derive_base_config
from .adapters import adapter_for
from .depth import DEPTH_FIELDS, at_target_depth, depth_fields, read_depth_fields
from .storage import stored_plan_dict
from .vocabulary import FAN_IN_KINDS, KINDS

PLAN_VERSION = 1
# Path components that wrappers insert into parameter names (torch.compile, FSDP1, activation checkpointing).
_WRAPPER_COMPONENTS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})


@dataclass(frozen=True)
class ParamInfo:
    """One parameter of the plan. ``base_shape`` uses mup's ``.bsh`` convention: ``None`` = not a width dim."""

    kind: str
    shape: tuple[int, ...]
    base_shape: tuple[int | None, ...]
    fan_in_mult: float = 1.0
    fan_out_mult: float = 1.0

    @property
    def width_mult(self) -> float:
        return self.fan_in_mult if self.kind in FAN_IN_KINDS else self.fan_out_mult

    @property
    def fan_ratio(self) -> float:
        """``fan_in_mult / fan_out_mult``: mup's ``fanin_fanout_mult_ratio`` used by the SGD rule."""
        return self.fan_in_mult / self.fan_out_mult

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "shape": list(self.shape), "base_shape": list(self.base_shape)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ParamInfo:
        v.check_choice("kind", d["kind"], KINDS)
        return cls(
            kind=d["kind"],
            shape=tuple(int(x) for x in d["shape"]),
            base_shape=tuple(None if x is None else int(x) for x in d["base_shape"]),
            fan_in_mult=float(d.get("fan_in_mult", 1.0)),
            fan_out_mult=float(d.get("fan_out_mult", 1.0)),
        )


@dataclass
class MuPPlan:
    """What muP changes in one model. ``to_dict()`` is what goes into ``config.hf_optim_mup`` (see storage.py).

    Attributes:
        params: canonical parameter name (no wrapper prefix) -> :class:`ParamInfo`.
        width_mult: hidden size / base hidden size: the readout's input multiplier.
        head_dim, base_head_dim: attention head dims of target and base (they fix the attention scale).
        output_mult, attn_mult: tunable constants of the readout and of the attention logits.
        zero_readout, zero_query: initialisation choices, recorded so a reader knows how the model started.
        base_depth, depth, depth_alpha: depth scaling (CompleteP / depth-µP, see :mod:`mup_integration.depth`): the
            tuned model's and this model's number of blocks and the branch exponent; all None = width-only muP.
    """

    params: dict[str, ParamInfo]
    width_mult: float
    head_dim: int | None = None
    base_head_dim: int | None = None
    output_mult: float = 1.0
    attn_mult: float = 1.0
    zero_readout: bool = False
    zero_query: bool = False
    base_config: dict[str, Any] = field(default_factory=dict)
    base_depth: int | None = None
    depth: int | None = None
    depth_alpha: float | None = None

    @property
    def depth_mult(self) -> float:
        """:math:`m_L = L/L_0` (1.0 for width-only muP)."""
        return 1.0 if self.depth_alpha is None else self.depth / self.base_depth

    @property
    def residual_multiplier(self) -> float:
        r"""The factor on every attention and MLP branch output: :math:`m_L^{-\alpha}` (1.0 for width-only muP)."""
        return 1.0 if self.depth_alpha is None else (self.depth / self.base_depth) ** -self.depth_alpha

    # ---- serialisation ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        # depth fields only when set, so width-only plans keep the dict (and config.json) they always had
        out = {k: val for k, val in asdict(self).items() if k != "params" and not (k in DEPTH_FIELDS and val is None)}
        out["version"] = PLAN_VERSION
        out["params"] = {name: info.to_dict() for name, info in self.params.items()}
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MuPPlan:
        if not isinstance(d, Mapping) or "params" not in d:
            raise ValueError(f"A muP plan must be a dict written by MuPPlan.to_dict() (with 'params'), got {d!r:.200}.")
        if d.get("version", PLAN_VERSION) != PLAN_VERSION:
            raise ValueError(f"The muP plan has version {d.get('version')!r}; this code reads version {PLAN_VERSION}.")
        kwargs = {
            k: d[k]
            for k in (
                "width_mult",
                "head_dim",
                "base_head_dim",
                "output_mult",
                "attn_mult",
                "zero_readout",
                "zero_query",
                "base_config",
            )
            if k in d
        }
        kwargs.update(read_depth_fields(d))
        return cls(params={n: ParamInfo.from_dict(p) for n, p in d["params"].items()}, **kwargs)

    # ---- name lookup ---------------------------------------------------------------------------------------------
    def resolve(self, name: str) -> str | None:
        """The plan's name for a (possibly wrapped) parameter name, or ``None``."""
        if name in self.params:
            return name
        name = ".".join(part for part in name.split(".") if part not in _WRAPPER_COMPONENTS)
        while True:
            if name in self.params:
                return name
            if not name.startswith("module."):  # DDP / DataParallel, possibly nested
                return None
            name = name[len("module.") :]

    def match(self, named_params: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor, ParamInfo]]:
        """Pair every parameter with its plan entry; raise a ValueError listing every mismatch."""
        matched, unknown, wrong_shape, seen = [], [], [], set()
        for name, p in named_params:
            key = self.resolve(name)
            if key is None:
                unknown.append(name)
                continue
            info = self.params[key]
            if tuple(p.shape) != info.shape:  # a DTensor reports its global shape, so FSDP2 shards pass
                wrong_shape.append(f"{name}: model {tuple(p.shape)} vs plan {info.shape}")
            seen.add(key)
            matched.append((name, p, info))
        missing = sorted(set(self.params) - seen)
        if unknown or wrong_shape or missing:
            parts = []
            if unknown:
                parts.append(f"{len(unknown)} parameter(s) not in the plan, e.g. {unknown[:3]}")
            if missing:
                parts.append(f"{len(missing)} plan entr(y/ies) with no parameter, e.g. {missing[:3]}")
            if wrong_shape:
                parts.append(f"{len(wrong_shape)} shape mismatch(es), e.g. {wrong_shape[:3]}")
            raise ValueError(
                "The muP plan does not match the model's parameters: " + "; ".join(parts) + ". Was the plan made for "
                "another config (or the model changed after planning, e.g. untied weights or adapters)? Rebuild it "
                "with mup_integration.make_plan(model.config, base_config)."
            )
        return matched


def _meta_model(model_cls: Any, config: Any) -> nn.Module:
    with torch.device("meta"):
        if model_cls is None:
            from transformers import AutoModelForCausalLM

            return AutoModelForCausalLM.from_config(config)
        return model_cls(config)


def _fan_dims(module: nn.Module, param_name: str, ndim: int) -> tuple[int | None, int | None]:
    """(fan-in dim, fan-out dim) of a parameter of ``module``; ``None`` for a vector."""
    if ndim < 2:
        return None, 0 if ndim == 1 else None
    if isinstance(module, nn.Embedding):
        return 0, 1
    if type(module).__name__ == "Conv1D":  # GPT-2's transposed linear: weight is (in, out)
        return 0, 1
    if ndim == 3:  # stacked expert matrices (experts, out, in), applied with F.linear per expert (Mixtral, Qwen3-MoE)
        return 2, 1
    return 1, 0  # nn.Linear and anything else stored (out, in)


def _shapes_and_fans(model: nn.Module) -> dict[str, tuple[tuple[int, ...], tuple[int | None, int | None]]]:
    out = {}
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            out[f"{mod_name}.{p_name}" if mod_name else p_name] = (tuple(p.shape), _fan_dims(module, p_name, p.dim()))
    # keep only the names named_parameters() reports (tied weights appear once, under the first owner)
    return {name: out[name] for name, _ in model.named_parameters()}


def plan_from_shapes(
    target: Mapping[str, tuple[tuple[int, ...], tuple[int | None, int | None]]],
    base: Mapping[str, tuple[int, ...]],
    delta: Mapping[str, tuple[int, ...]],
) -> dict[str, ParamInfo]:
    """Per-parameter infos from target shapes (+ fan dims), base shapes and a wider "delta" base's shapes."""
    if set(target) != set(base) or set(base) != set(delta):
        raise ValueError(
            f"target and base models have different parameter names: "
            f"{sorted(set(target) ^ set(base))[:5]}. Base and target must be the same architecture."
        )
    params = {}
    for name, (shape, (fan_in, fan_out)) in target.items():
        base_shape = base[name]
        width_dims = [b != d for b, d in zip(base_shape, delta[name])]
        mults = []
        for i, (n, n0, is_width) in enumerate(zip(shape, base_shape, width_dims)):
            if not is_width:
                if n != n0:
                    raise ValueError(
                        f"{name}: dimension {i} is {n} in the target but {n0} in the base, and it does "
                        "not scale with the width (e.g. vocab_size or num_hidden_layers differ?)."
                    )
                mults.append(1.0)
            elif n < n0:
                raise ValueError(
                    f"{name}: the base is wider than the target in dimension {i} ({n0} > {n}); the base "
                    "config must be the narrow one."
                )
            else:
                mults.append(n / n0)
        params[name] = _param_info(
            shape, tuple(n0 if w else None for n0, w in zip(base_shape, width_dims)), mults, (fan_in, fan_out)
        )
    return params


def _param_info(
    shape: tuple[int, ...],
    base_shape: tuple[int | None, ...],
    mults: Sequence[float],
    fans: tuple[int | None, int | None],
) -> ParamInfo:
    """The :class:`ParamInfo` of a parameter whose ``base_shape`` is ``None`` where a dimension does not grow with width
    (the kind follows from its fan dimensions); plans from configs and from mup base shapes share it, so agree."""
    fan_in, fan_out = fans
    in_w = fan_in is not None and base_shape[fan_in] is not None
    out_w = fan_out is not None and base_shape[fan_out] is not None
    if fan_in is None:
        kind = "vector"
    elif in_w and out_w:
        kind = "hidden"
    elif out_w:
        kind = "embedding"
    elif in_w:
        kind = "readout"
    else:
        kind = "vector"  # a finite matrix: no width dims, every multiplier is 1
    fan_in_mult = mults[fan_in] if fan_in is not None else 1.0
    fan_out_mult = mults[fan_out] if fan_out is not None else 1.0
    return ParamInfo(kind, tuple(shape), tuple(base_shape), fan_in_mult, fan_out_mult)


def make_plan(
    config: Any,
    base_config: Any | None = None,
    *,
    base_width: int | None = None,
    base_head_dim: int | None = None,
    base_intermediate_size: int | None = None,
    model_cls: Any | None = None,
    output_mult: float = 1.0,
    attn_mult: float = 1.0,
    zero_readout: bool = False,
    zero_query: bool = False,
    base_depth: int | None = None,
    depth_alpha: float | None = None,
) -> MuPPlan:
    """Compute the plan for ``config`` against ``base_config`` (or a base derived with ``base_width``).

    Both models (and a 2x-wider copy of the base, to tell width dims from fixed ones even when base == target) are
    built on the meta device: no memory is allocated and nothing is initialised. ``base_depth`` and ``depth_alpha``
    (both or neither) add depth scaling (:mod:`mup_integration.depth`); a ``base_config`` with another number of
    layers than ``config`` must then have ``base_depth`` layers (its width is compared at the target's depth).
    """
    if (base_config is None) == (base_width is None):
        raise ValueError(
            "Pass exactly one of base_config (a config of the narrow model) and base_width (its hidden "
            f"size), got base_config={type(base_config).__name__}, base_width={base_width!r}."
        )
    adapter_for(config)  # a ValueError naming the supported model types
    for name, value in (("output_mult", output_mult), ("attn_mult", attn_mult)):
        v.check_positive(name, value)
    for name, value in (("zero_readout", zero_readout), ("zero_query", zero_query)):
        v.check_bool(name, value)
    depth = depth_fields(config, base_depth, depth_alpha)
    if base_config is None:
        base_config = derive_base_config(
            config, base_width, base_head_dim=base_head_dim, base_intermediate_size=base_intermediate_size
        )
    if type(base_config) is not type(config):
        raise TypeError(f"base_config must be a {type(config).__name__} like config, got {type(base_config).__name__}.")
    base_config = at_target_depth(base_config, config, base_depth)
    width, base = config_hidden_size(config), config_hidden_size(base_config)
    if base > width:
        raise ValueError(
            f"The base is wider than the target: base hidden_size={base} > hidden_size={width}. "
            "muP transfers from a narrow base to a wide target; swap the configs."
        )
    delta_config = derive_base_config(base_config, 2 * base)
    target_model = _meta_model(model_cls, config)
    target = _shapes_and_fans(target_model)
    base_shapes = {n: s for n, (s, _) in _shapes_and_fans(_meta_model(model_cls, base_config)).items()}
    delta_shapes = {n: s for n, (s, _) in _shapes_and_fans(_meta_model(model_cls, delta_config)).items()}
    base_dict = {
        k: val
        for k, val in base_config.to_dict().items()
        if k
        in (
            "hidden_size",
            "n_embd",
            "intermediate_size",
            "n_inner",
            "num_attention_heads",
            "n_head",
            "num_key_value_heads",
            "head_dim",
        )
    }
    return MuPPlan(
        params=plan_from_shapes(target, base_shapes, delta_shapes),
        width_mult=width / base,
        head_dim=config_head_dim(config),
        base_head_dim=config_head_dim(base_config),
        output_mult=float(output_mult),
        attn_mult=float(attn_mult),
        zero_readout=zero_readout,
        zero_query=zero_query,
        base_config=base_dict,
        **depth,
    )


_WRAPPER_CLASSES = frozenset({"DistributedDataParallel", "DataParallel", "OptimizedModule", "FullyShardedDataParallel"})


def unwrap(model: nn.Module) -> nn.Module:
    """The innermost model under DDP (``.module``), torch.compile (``._orig_mod``) and FSDP1 wrappers."""
    while type(model).__name__ in _WRAPPER_CLASSES:
        inner = (
            model._modules.get("_orig_mod")
            or model._modules.get("module")
            or model._modules.get("_fsdp_wrapped_module")
        )
        if inner is None:
            break
        model = inner
    return model


def get_plan(model: nn.Module) -> MuPPlan:
    """The plan stored in the model's config (``hf_optim_mup``, or an old ``mup`` dict; see storage.py), looking
    through DDP / compile wrappers."""
    raw = stored_plan_dict(getattr(unwrap(model), "config", None))
    if not raw:
        raise ValueError(
            f"{type(model).__name__} carries no muP plan (config.hf_optim_mup is missing). Build the "
            "model with mup_integration.make_mup_model(...) or call apply_mup(model, make_plan(...))."
        )
    return MuPPlan.from_dict(raw)


def has_plan(model: nn.Module) -> bool:
    """Whether the model's config carries a plan; a ValueError when it carries upstream transformers' muP switch."""
    return bool(stored_plan_dict(getattr(unwrap(model), "config", None)))
