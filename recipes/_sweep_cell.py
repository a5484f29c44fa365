r"""One sweep cell: build a small LLaMA (SP or muP), train it with a lean loop, report final train/val loss.

The loop is plain PyTorch on purpose: hundreds of cells of a few seconds each cannot afford the Trainer's set-up.

Schedule (peak :math:`\alpha`, warm-up :math:`W`, total :math:`T`, floor :math:`r`):

.. math::
    \eta_t = \frac{t}{W} \ (t < W), \qquad
    \eta_t = r + (1-r)\,\tfrac12\bigl(1+\cos(\pi\,\tfrac{t-W}{T-W})\bigr) \ \text{(cosine)}, \quad 1 \ \text{(constant)}

and every group's lr is its own peak (muP-scaled where applicable) times :math:`\eta_t`, so ``independent`` decay
(:math:`x \leftarrow x(1-\eta_t\lambda)`) follows the same multiplier.
"""

from __future__ import annotations

import inspect
import math
import time
import warnings
from typing import Any

import torch
import torch.nn.functional as F

from ._sweep_config import Cell
from ._sweep_data import CharData, vocab_size
from .schedules import cosine_to_floor


def llama_config(cell: Cell, width: int):
    from transformers import LlamaConfig

    m = cell.model
    heads = width // m.head_dim
    return LlamaConfig(
        vocab_size=vocab_size(), hidden_size=width, intermediate_size=m.ffn_mult * width,
        num_hidden_layers=m.layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=m.seq_len, tie_word_embeddings=False, initializer_range=m.init_std,
    )


def build_model(cell: Cell) -> tuple[torch.nn.Module, dict[torch.Tensor, dict[str, Any]] | None]:
    """The model and the optimizer's per-parameter overrides (``None`` under SP)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(cell.seed)
    config = llama_config(cell, cell.width)
    if cell.parametrization == "sp":
        return LlamaForCausalLM(config), None
    from mup_integration.groups import param_overrides
    from mup_integration.surgery import make_mup_model

    from hf_optim.registry import get_spec

    model = make_mup_model(config, llama_config(cell, cell.model.base_width))
    family = get_spec(cell.optimizer).mup_family  # Adam-like: hidden lr / width_mult; SGD: as mup.MuSGD
    return model, dict(param_overrides(model, family=family, wd_rule=cell.wd_rule))


def lr_multiplier(step: int, cell: Cell) -> float:
    """recipes.schedules' cosine-to-floor; ``constant`` is the same with floor 1 (warm-up, then flat)."""
    t = cell.train
    floor = 1.0 if t.schedule == "constant" else t.min_lr_ratio
    return cosine_to_floor(step, num_warmup_steps=t.warmup_steps, decay_steps=t.steps, floor=floor)


def build_optimizer(model: torch.nn.Module, cell: Cell, overrides) -> torch.optim.Optimizer:
    """The cell's registered optimizer (default hf_optim's AdamW); weight decay on matrices only (norm gains
    excluded, as the HF Trainer does); Adam-like optimizers get the settings' betas and eps."""
    from hf_optim.registry import get_spec

    spec = get_spec(cell.optimizer)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2]},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    cls = spec.resolve()
    kwargs: dict[str, Any] = dict(spec.defaults)
    accepted = inspect.signature(cls).parameters
    # Adam-like constructors take (betas, eps); others (SGD, Adafactor's knobs) would reject them.
    if "betas" in accepted and "eps" in accepted:
        kwargs.update(betas=(cell.train.beta1, cell.train.beta2), eps=cell.train.eps)
    kwargs.update(dict(cell.optimizer_args))
    with warnings.catch_warnings():
        # LR x WD grids deliberately include large `independent` λ; the once-per-process hint is noise here.
        warnings.simplefilter("ignore", UserWarning)
        return cls(
            [g for g in groups if g["params"]], lr=cell.lr, weight_decay=cell.weight_decay,
            weight_decay_mode=cell.weight_decay_mode, param_overrides=overrides, **kwargs,
        )


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches, device: torch.device) -> float:
    model.eval()
    total = 0.0
    for x, y in batches:
        logits = model(input_ids=x.to(device)).logits
        total += F.cross_entropy(logits.flatten(0, 1).float(), y.to(device).flatten()).item()
    model.train()
    return total / len(batches)


def run_cell(cell: Cell, device: str = "cpu") -> dict[str, Any]:
    """Train one cell and return its result row (losses are ``nan`` when the run diverged)."""
    torch.set_num_threads(1)
    start = time.perf_counter()
    t = cell.train
    data = CharData(cell.model.seq_len, cell.model.batch_size, train_chars=t.train_chars)
    dev = torch.device(device)
    model, overrides = build_model(cell)
    model.to(dev).train()
    optimizer = build_optimizer(model, cell, overrides)
    peaks = [g["lr"] for g in optimizer.param_groups]
    batches = data.train_batches(cell.seed)
    losses: list[float] = []
    curve: list[tuple[int, float]] = []
    diverged = False
    every = max(1, t.steps // 20)
    for step in range(t.steps):
        mult = lr_multiplier(step, cell)
        for group, peak in zip(optimizer.param_groups, peaks):
            group["lr"] = peak * mult
        x, y = next(batches)
        logits = model(input_ids=x.to(dev)).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.to(dev).flatten())
        value = loss.item()
        if not math.isfinite(value) or value > t.diverge_loss:
            diverged = True
            curve.append((step, value if math.isfinite(value) else float("nan")))
            break
        loss.backward()
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(value)
        if step % every == 0 or step == t.steps - 1:
            curve.append((step, value))
    tail = losses[-max(1, t.steps // 10):]
    val = float("nan") if diverged else evaluate(model, data.val_batches(t.eval_batches), dev)
    if not math.isfinite(val):
        diverged, val = True, float("nan")
    return {
        "key": cell.key,
        "train_loss": float("nan") if diverged else sum(tail) / len(tail),
        "val_loss": val,
        "diverged": diverged,
        "steps_done": len(losses),
        "n_params": sum(p.numel() for p in model.parameters()),
        "seconds": round(time.perf_counter() - start, 2),
        "device": device,
        "curve": curve,
    }
