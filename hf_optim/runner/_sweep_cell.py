r"""One sweep cell: build a small LLaMA or OLMo-2 (SP or muP), train it with a lean loop, report final train/val loss.

The loop is plain PyTorch on purpose: hundreds of cells of a few seconds each cannot afford the Trainer's set-up.

Schedule (peak :math:`\alpha`, warm-up :math:`W`, total :math:`T`, floor :math:`r`):

.. math::
    \eta_t = \frac{t}{W} \ (t < W), \qquad
    \eta_t = r + (1-r)\,\tfrac12\bigl(1+\cos(\pi\,\tfrac{t-W}{T-W})\bigr) \ \text{(cosine)}, \quad 1 \ \text{(constant)}

and every group's lr is its own peak (muP-scaled where applicable) times :math:`\eta_t`, so ``independent`` decay
(:math:`x \leftarrow x(1-\eta_t\lambda)`) follows the same multiplier.
"""

from __future__ import annotations

import math
import re
import time
import warnings
from typing import Any

import torch
import torch.nn.functional as F

from ._sweep_axes import DEPTH_ALPHA
from ._sweep_config import Cell
from ._sweep_data import CharData
from ._sweep_model import model_class, model_config
from .schedules import cosine_to_floor

#: The hidden matrices (``train.decay: hidden``): attention q/k/v/o and MLP gate/up/down of every block. Same names in
#: LLaMA and OLMo-2 (and kept by the muP surgery).
HIDDEN_MATRIX = re.compile(r"(^|\.)layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$")


def build_model(cell: Cell) -> torch.nn.Module:
    """The cell's model (under muP with its plan in the config, which the optimizer factory reads)."""
    torch.manual_seed(cell.seed)
    config = model_config(cell.model, cell.width)
    if cell.parametrization == "sp":
        return model_class(cell.model.arch)(config)
    from mup_integration.surgery import make_mup_model

    alpha = DEPTH_ALPHA.get(cell.parametrization)  # depth scaling: m_L = layers / base_depth (mup_integration.depth)
    depth = {} if alpha is None else {"base_depth": cell.model.base_depth, "depth_alpha": alpha}
    return make_mup_model(
        config,
        model_config(cell.model, cell.model.base_width),
        model_cls=model_class(cell.model.arch),
        output_mult=cell.model.output_mult,
        attn_mult=cell.model.attn_mult,
        **depth,
    )


def lr_multiplier(step: int, cell: Cell) -> float:
    """hf_optim.runner.schedules' cosine-to-floor; ``constant`` is the same with floor 1 (warm-up, then flat)."""
    t = cell.train
    floor = 1.0 if t.schedule == "constant" else t.min_lr_ratio
    return cosine_to_floor(step, num_warmup_steps=t.warmup_steps, decay_steps=t.steps, floor=floor)


def decayed(name: str, param: torch.Tensor, decay: str) -> bool:
    """Whether weight decay applies to ``param`` under ``train.decay``.

    ``all``: every >= 2-D tensor (norm gains excluded, as the HF Trainer does), so the embedding and lm_head too. Those
    two are not scale-invariant (the readout norm is a logit temperature), and there coherent Adam updates settle at
    |w| ≈ 1/λ for coupled decay whatever the lr, which makes the best coupled λ flat in lr (docs/experiments).
    ``hidden``: only the attention and MLP matrices (:data:`HIDDEN_MATRIX`), the tensors the equilibrium argument for
    decoupled decay is about.
    """
    if decay == "all":
        return param.ndim >= 2
    return bool(HIDDEN_MATRIX.search(name))


def build_optimizer(model: torch.nn.Module, cell: Cell) -> torch.optim.Optimizer:
    """The cell's registered optimizer (default hf_optim's AdamW) from :func:`hf_optim.create_optimizer`: weight
    decay on the tensors that ``train.decay`` selects (:func:`decayed`), the settings' betas and eps where the
    optimizer takes them, muP multipliers from the model's plan."""
    from hf_optim.factory import create_optimizer
    from hf_optim.registry import get_spec

    spec = get_spec(cell.optimizer)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if cell.weight_decay > 0 and not any(decayed(n, p, cell.train.decay) for n, p in named):
        raise ValueError(
            f"train.decay={cell.train.decay!r} selects no parameter of {type(model).__name__}; "
            f"parameter names: {[n for n, _ in named][:8]} ..."
        )
    knobs: dict[str, Any] = {"weight_decay_mode": cell.weight_decay_mode, **dict(cell.optimizer_args)}
    if spec.takes_betas:
        knobs["betas"] = (cell.train.beta1, cell.train.beta2)
    if spec.takes_eps:
        knobs["eps"] = cell.train.eps
    with warnings.catch_warnings():
        # LR x WD grids deliberately include large `independent` λ; the once-per-process hint is noise here.
        warnings.simplefilter("ignore", UserWarning)
        return create_optimizer(
            cell.optimizer,
            model,
            lr=cell.lr,
            weight_decay=cell.weight_decay,
            mup_wd_rule=cell.wd_rule,
            no_decay=lambda name, param: not decayed(name, param, cell.train.decay),
            **knobs,
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
    # Strong decay drives some weights and Adam moments into subnormal floats, which x86 CPUs process ~10-100x
    # slower (a 2000-step cell took 145 s instead of 25 s); flushing them to zero does not change the losses.
    # Process-wide in torch, so switched back off (torch's default; it has no getter) for a caller's later work.
    torch.set_flush_denormal(True)
    try:
        return _train(cell, device)
    finally:
        torch.set_flush_denormal(False)


def _train(cell: Cell, device: str) -> dict[str, Any]:
    start = time.perf_counter()
    t = cell.train
    data = CharData(cell.model.seq_len, cell.model.batch_size, train_chars=t.train_chars)
    dev = torch.device(device)
    model = build_model(cell)
    model.to(dev).train()
    optimizer = build_optimizer(model, cell)
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
    tail = losses[-max(1, t.steps // 10) :]
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
