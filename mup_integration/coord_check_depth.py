r"""Depth coordinate check: does the residual stream keep its size, and its per-step change, as the model deepens?

At a fixed width, for each depth :math:`L` and each parametrization (``mup``: width-only muP, no depth scaling;
``depth_mup``: branch multiplier :math:`m_L^{-1/2}`; ``completep``: :math:`m_L^{-1}`, with the matching lr and
:math:`\epsilon` rules of :mod:`mup_integration.depth`; base depth = the smallest depth), train a fresh model for a few
Adam steps on the same text. Before every update, a fixed probe batch is run through the model and forward hooks
record the mean absolute coordinate of the embedding output, the final residual stream (the last block's output,
before the final norm), the logits, and the change of the last two since step 0 (:math:`|h_t - h_0|`, the feature
update). Under CompleteP and depth-µP these curves are flat in :math:`L`; without depth scaling the residual stream
and its updates grow with depth (Dey et al. 2025, arXiv 2505.01618, Figure 7).

``hf-optim coord-check --depths 2,4,8,16,32,64 --width 64`` writes ``coord_check_depth.csv`` / ``.png``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from hf_optim import _validation as v

from ._coord_inputs import _batches, _config, _save_figure, _sweep, _train_step, _write_csv

#: parametrization -> depth_alpha (None = width-only muP)
DEPTH_PARAMETRIZATIONS: dict[str, float | None] = {"mup": None, "depth_mup": 0.5, "completep": 1.0}
LABELS = {"mup": "width-only muP", "depth_mup": "depth-µP (α=0.5)", "completep": "CompleteP (α=1)"}
QUANTITIES = ("embed", "residual", "residual_update", "logits", "logits_update")


@dataclass(frozen=True)
class DepthRecord:
    parametrization: str
    depth: int
    step: int
    quantity: str
    mean_abs: float


def _last_block(model: nn.Module) -> nn.Module:
    layers = next(m for m in model.modules() if isinstance(m, nn.ModuleList))
    return layers[-1]


def run_one_depth(
    parametrization: str,
    depth: int,
    *,
    base_depth: int,
    width: int = 64,
    model: str = "llama",
    steps: int = 6,
    lr: float = 3e-3,
    eps: float = 1e-8,
    batch_size: int = 4,
    seq_len: int = 32,
    vocab_size: int = 256,
    seed: int = 0,
) -> list[DepthRecord]:
    """Train one model for ``steps`` Adam steps; return the probe-batch statistics before every update."""
    from hf_optim.optim.adam.optimizers import AdamW

    from .groups import param_overrides
    from .surgery import make_mup_model

    v.check_choice("parametrization", parametrization, tuple(DEPTH_PARAMETRIZATIONS))
    alpha = DEPTH_PARAMETRIZATIONS[parametrization]
    torch.manual_seed(seed)
    config = _config(model, width, depth, vocab_size, seq_len)
    config._attn_implementation = "eager"
    depth_kwargs = {} if alpha is None else {"base_depth": base_depth, "depth_alpha": alpha}
    net = make_mup_model(config, base_width=width, **depth_kwargs)
    opt = AdamW(
        net.parameters(),
        lr=lr,
        eps=eps,
        weight_decay=0.0,
        param_overrides=param_overrides(net, family="adam", wd_rule="none", eps=eps),
    )
    *train_batches, probe = _batches(vocab_size, batch_size, seq_len, steps + 1)
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Callable:
        def fn(module: nn.Module, args: Any, output: Any) -> None:
            seen[name] = (output[0] if isinstance(output, tuple) else output).detach().double()

        return fn

    handles = [
        net.get_input_embeddings().register_forward_hook(keep("embed")),
        _last_block(net).register_forward_hook(keep("residual")),
        net.get_output_embeddings().register_forward_hook(keep("logits")),
    ]
    records: list[DepthRecord] = []
    first: dict[str, torch.Tensor] = {}
    try:
        for step, tokens in enumerate(train_batches):
            net.eval()
            with torch.no_grad():
                net(input_ids=probe)
            first = first or {k: t.clone() for k, t in seen.items()}
            values = {k: seen[k].abs().mean().item() for k in ("embed", "residual", "logits")}
            values |= {f"{k}_update": (seen[k] - first[k]).abs().mean().item() for k in ("residual", "logits")}
            records += [DepthRecord(parametrization, depth, step, q, values[q]) for q in QUANTITIES]
            net.train()
            _train_step(net, opt, tokens, f"{parametrization} depth={depth}", step)
    finally:
        for h in handles:
            h.remove()
    return records


def coord_check_depth(
    depths: Sequence[int] = (2, 4, 8, 16, 32, 64),
    *,
    base_depth: int | None = None,
    parametrizations: Sequence[str] = tuple(DEPTH_PARAMETRIZATIONS),
    progress: Callable[[str], None] | None = None,
    **kwargs: Any,
) -> list[DepthRecord]:
    """:func:`run_one_depth` for every depth and parametrization; ``base_depth`` defaults to the smallest depth."""
    depths = sorted(int(d) for d in depths)
    if not depths or depths[0] < 1:
        raise ValueError(f"depths must name at least one depth >= 1, got {depths!r}.")
    for p in parametrizations:
        v.check_choice("parametrizations", p, tuple(DEPTH_PARAMETRIZATIONS))
    base_depth = depths[0] if base_depth is None else base_depth
    run = partial(run_one_depth, base_depth=base_depth, **kwargs)
    return _sweep(parametrizations, depths, run, "{p:9s} depth={size:3d}", progress)


def by_depth(records: Sequence[DepthRecord], parametrization: str, quantity: str, step: int) -> dict[int, float]:
    return {
        r.depth: r.mean_abs
        for r in records
        if (r.parametrization, r.quantity, r.step) == (parametrization, quantity, step)
    }


def depth_growth(records: Sequence[DepthRecord], parametrization: str, quantity: str, step: int) -> float:
    """The quantity at the largest depth / at the smallest, at ``step``."""
    values = by_depth(records, parametrization, quantity, step)
    return values[max(values)] / values[min(values)]


def depth_spread(records: Sequence[DepthRecord], parametrization: str, quantity: str, step: int) -> float:
    """max / min of the quantity across depths at ``step``."""
    values = by_depth(records, parametrization, quantity, step).values()
    return max(values) / min(values)


def write_csv(records: Sequence[DepthRecord], path: str | os.PathLike) -> None:
    _write_csv(records, DepthRecord.__dataclass_fields__, path)


def plot(
    records: Sequence[DepthRecord],
    path: str | os.PathLike,
    title: str = "",
    quantities: Sequence[str] = ("residual", "residual_update", "logits_update"),
) -> None:
    """Rows: quantities; columns: parametrizations; mean |.| vs depth (log-log), one line per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = [p for p in DEPTH_PARAMETRIZATIONS if any(r.parametrization == p for r in records)]
    steps = sorted({r.step for r in records})
    fig, axes = plt.subplots(
        len(quantities),
        len(params),
        figsize=(3.6 * len(params), 2.7 * len(quantities)),
        sharex=True,
        sharey="row",
        squeeze=False,
    )
    for i, q in enumerate(quantities):
        for j, p in enumerate(params):
            ax = axes[i][j]
            for step in steps:
                values = by_depth(records, p, q, step)
                if q.endswith("_update") and step == 0:
                    continue  # zero by definition
                ds = sorted(values)
                ax.plot(
                    ds,
                    [values[d] for d in ds],
                    marker="o",
                    ms=3,
                    label=f"step {step}",
                    color=plt.cm.coolwarm(step / max(1, steps[-1])),
                )
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            if i == 0:
                ax.set_title(LABELS[p], fontsize=9)
            if i == len(quantities) - 1:
                ax.set_xlabel("depth L")
            if j == 0:
                ax.set_ylabel(f"mean |{q}|", fontsize=8)
    _save_figure(fig, axes, path, title)


def report(records: Sequence[DepthRecord], steps: int) -> list[str]:
    """Deepest / shallowest ratio per parametrization at the last step (the lines the CLI prints)."""
    last = steps - 1
    params = [p for p in DEPTH_PARAMETRIZATIONS if any(r.parametrization == p for r in records)]
    lines = [f"deepest/shallowest ratio of mean |.| at step {last}:"]
    for p in params:
        ratios = "  ".join(
            f"{q} {depth_growth(records, p, q, last):6.2f}x" for q in ("residual", "residual_update", "logits_update")
        )
        lines.append(f"  {p:9s} {ratios}")
    return lines
