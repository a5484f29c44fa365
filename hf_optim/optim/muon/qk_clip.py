r"""QK-clip (MuonClip, Kimi K2): after a step, shrink the query/key weights of every head whose attention logit grew
past :math:`\tau`.

During each training forward, a pre-hook on every LLaMA-family attention module (``q_proj``, ``k_proj``, RoPE
applied by the model's ``apply_rotary_pos_emb``) recomputes the softmax inputs of each head,
:math:`S_h = \max_{b,\,i,\,j \le i} \tfrac{1}{\sqrt d}\, q^h_{b,i} \cdot k^h_{b,j}` (``module.scaling`` as the
model uses it; padding excluded), and keeps the running maximum since the last step (gradient accumulation, every
micro-batch; under DDP / FSDP the maximum over ranks, so every rank rescales alike). After the optimizer step, with
:math:`\gamma_h = \min(1, \tau / S_h)`, each key head :math:`g` (shared by the query heads :math:`G_g` under GQA)
and query head :math:`h \in G_g` are rescaled

.. math::
   W_k^g \leftarrow \sqrt{\gamma_g}\, W_k^g, \qquad W_q^h \leftarrow \frac{\gamma_h}{\sqrt{\gamma_g}}\, W_q^h,
   \qquad \gamma_g = \min_{h \in G_g} \gamma_h,

(biases likewise), so the logit of head :math:`h` on the same inputs is multiplied by exactly :math:`\gamma_h`:
a head at :math:`S_h > \tau` comes back to :math:`\tau`, every other head's logits are unchanged (under GQA its
query and key weights trade a factor). With one query head per key head this is Kimi K2's split
(:math:`\sqrt{\gamma_h}` on each). RoPE is a rotation, so scaling rows of :math:`W_q`, :math:`W_k` scales the
rotated :math:`q`, :math:`k`.

Cost per training forward and layer: one more ``q_proj`` / ``k_proj`` product and the :math:`H \times s \times s`
logits of one sequence at a time, without gradients. Attention with q/k normalisation (Qwen3's ``q_norm``) is
refused: scaling :math:`W_q` does not change a normalised query.

Reference: Kimi Team (2025), *Kimi K2: Open Agentic Intelligence*, arXiv 2507.20534, section 2.1 (MuonClip).
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

#: Models with a recorder attached (a model gets one; a second ``attach`` returns it).
_ATTACHED: weakref.WeakKeyDictionary[nn.Module, QKClip] = weakref.WeakKeyDictionary()


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The LLaMA-family attention modules of ``model``: separate ``q_proj`` / ``k_proj`` ``nn.Linear`` layers,
    ``head_dim``, ``scaling`` and a module-level ``apply_rotary_pos_emb`` (LLaMA, Mistral, Qwen2, ...)."""
    found = []
    for module in model.modules():
        if not (
            isinstance(getattr(module, "q_proj", None), nn.Linear)
            and isinstance(getattr(module, "k_proj", None), nn.Linear)
        ):
            continue
        name = type(module).__name__
        if getattr(module, "q_norm", None) is not None or getattr(module, "k_norm", None) is not None:
            raise ValueError(
                f"qk_clip: {name} normalises q and k (q_norm / k_norm), so scaling W_q and W_k does not change its "
                "logits; QK-norm already bounds them. Drop qk_clip for this model."
            )
        rope = getattr(sys.modules.get(type(module).__module__), "apply_rotary_pos_emb", None)
        if rope is None or not hasattr(module, "head_dim") or not hasattr(module, "scaling"):
            raise ValueError(
                f"qk_clip: {name} has q_proj / k_proj but not the LLaMA-family layout (head_dim, scaling and "
                "apply_rotary_pos_emb in its module); qk_clip supports LLaMA-family attention only."
            )
        found.append(module)
    if not found:
        raise ValueError(
            f"qk_clip needs LLaMA-family attention (separate q_proj / k_proj with RoPE); {type(model).__name__} has "
            "none (GPT-2's fused c_attn, for one, is not supported). Drop qk_clip for this model."
        )
    return found


def attach(model: nn.Module) -> QKClip:
    """The recorder of ``model`` (created and hooked on first use): call before building the optimizer by hand;
    :func:`hf_optim.create_optimizer`, the Trainer and ``hf-optim train`` call it when ``qk_clip`` is set."""
    recorder = _ATTACHED.get(model)
    if recorder is None:
        recorder = QKClip(attention_modules(model))
        _ATTACHED[model] = recorder
    return recorder


def prepare(model: nn.Module | None, knobs: dict[str, Any]) -> None:
    """The optimizer spec's model hook: attach the recorder when ``qk_clip`` is set and a model is known."""
    if knobs.get("qk_clip") is not None and model is not None:
        attach(model)


def find(params: Iterable[torch.Tensor]) -> QKClip | None:
    """The attached recorder whose query and key weights are all among ``params`` (None if there is none)."""
    ids = {id(p) for p in params}
    for recorder in list(_ATTACHED.values()):
        if all(id(m.q_proj.weight) in ids and id(m.k_proj.weight) in ids for m in recorder.modules):
            return recorder
    return None


class QKClip:
    """Per-head running maxima of the attention logits of ``modules``, and the rescaling that caps them."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.modules = modules
        self.maxima: dict[int, torch.Tensor] = {}
        for index, module in enumerate(modules):
            module.register_forward_pre_hook(self._hook(index), with_kwargs=True)

    def _hook(self, index: int):
        def observe(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            if not module.training or not torch.is_grad_enabled():
                return  # evaluation and generation are not training steps
            hidden = args[0] if args else kwargs["hidden_states"]
            positions = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
            if positions is None:
                raise ValueError(f"qk_clip: {type(module).__name__} was called without position_embeddings.")
            mask = kwargs.get("attention_mask", args[2] if len(args) > 2 else None)
            with torch.no_grad():
                current = max_logits(module, hidden, positions, mask)
            previous = self.maxima.get(index)
            self.maxima[index] = current if previous is None else torch.maximum(previous, current)

        return observe

    @torch.no_grad()
    def clip(self, tau: float) -> None:
        """Rescale the heads whose recorded maximum exceeds ``tau``, then forget the maxima (next step starts over)."""
        for index, module in enumerate(self.modules):
            maxima = self.maxima.get(index)
            if maxima is None:
                continue
            maxima = _max_over_ranks(maxima)
            gamma = torch.clamp(tau / maxima, max=1.0)  # per query head
            if bool((gamma < 1.0).any()):
                _rescale(module, gamma)
        self.maxima.clear()


def max_logits(
    module: nn.Module, hidden: torch.Tensor, positions: tuple[torch.Tensor, torch.Tensor], mask: Any
) -> torch.Tensor:
    """Per query head, the largest softmax input ``scaling * q·k`` over the batch, causal and padding masks applied."""
    rope = sys.modules[type(module).__module__].apply_rotary_pos_emb
    batch, length = hidden.shape[:2]
    d = module.head_dim
    q = module.q_proj(hidden).view(batch, length, -1, d).transpose(1, 2)
    k = module.k_proj(hidden).view(batch, length, -1, d).transpose(1, 2)
    q, k = rope(q, k, *positions)
    heads, kv_heads = q.shape[1], k.shape[1]
    k = k.repeat_interleave(heads // kv_heads, dim=1)
    allowed = torch.ones(length, length, dtype=torch.bool, device=hidden.device)
    if getattr(module, "is_causal", True):
        allowed = allowed.tril()
    out = torch.full((heads,), float("-inf"), device=hidden.device, dtype=torch.float32)
    for b in range(batch):  # one sequence's (H, s, s) logits at a time
        logits = (q[b].float() @ k[b].float().transpose(-1, -2)) * module.scaling
        keep = allowed
        if isinstance(mask, torch.Tensor):
            row = mask[b if mask.shape[0] > 1 else 0, 0, :, :length]
            keep = keep & (row if row.dtype == torch.bool else row == 0)
        logits = logits.masked_fill(~keep, float("-inf"))
        out = torch.maximum(out, logits.amax(dim=(-2, -1)))
    return out


def _max_over_ranks(maxima: torch.Tensor) -> torch.Tensor:
    distributed = torch.distributed
    if distributed.is_available() and distributed.is_initialized() and distributed.get_world_size() > 1:
        maxima = maxima.clone()
        distributed.all_reduce(maxima, op=distributed.ReduceOp.MAX)
    return maxima


def _rescale(module: nn.Module, gamma: torch.Tensor) -> None:
    """W_k^g *= sqrt(min_{h in g} gamma_h), W_q^h *= gamma_h / sqrt(gamma_g): head h's logits times gamma_h."""
    d = module.head_dim
    heads = gamma.numel()
    kv_heads = module.k_proj.out_features // d
    gamma_kv = gamma.view(kv_heads, heads // kv_heads).amin(dim=1).sqrt()
    q_factor = gamma / gamma_kv.repeat_interleave(heads // kv_heads)
    for linear, factor in ((module.q_proj, q_factor), (module.k_proj, gamma_kv)):
        rows = factor.repeat_interleave(d)
        _scale_rows(linear.weight, rows.view(-1, 1))
        if linear.bias is not None:
            _scale_rows(linear.bias, rows)


def _scale_rows(param: torch.Tensor, factor: torch.Tensor) -> None:
    """``param *= factor`` (broadcast over rows); an FSDP2 shard takes its own rows of ``factor``."""
    if type(param).__name__ == "DTensor":
        from torch.distributed.tensor import distribute_tensor

        local = distribute_tensor(factor.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().mul_(local.to_local().to(param.dtype))
        return
    param.mul_(factor.to(device=param.device, dtype=param.dtype))
