"""What the width and depth coordinate checks share: a small config per family, fixed text batches, the training
step and the CSV and figure output."""

from __future__ import annotations

import csv
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict
from importlib import resources
from typing import Any

import torch
from torch import nn


def _config(model: str, width: int, num_layers: int, vocab_size: int, seq_len: int) -> Any:
    if model == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=seq_len,
            tie_word_embeddings=False,
        )
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=vocab_size,
        n_embd=width,
        n_layer=num_layers,
        n_head=4,
        n_positions=seq_len,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )


def _batches(vocab_size: int, batch_size: int, seq_len: int, steps: int) -> list[torch.Tensor]:
    """Consecutive byte-level chunks of the bundled Tiny Shakespeare (the same text for every width)."""
    text = resources.files("hf_optim").joinpath("data/tinyshakespeare.txt").read_bytes()
    need = steps * batch_size * seq_len
    data = torch.tensor(list(text[:need]), dtype=torch.long) % vocab_size
    return list(data.view(steps, batch_size, seq_len))


def _train_step(net: nn.Module, opt: torch.optim.Optimizer, tokens: torch.Tensor, label: str, step: int) -> None:
    """One language-modelling step; a non-finite loss stops the check, since every later record would be noise."""
    loss = net(input_ids=tokens, labels=tokens).loss
    if not math.isfinite(loss.item()):
        raise FloatingPointError(f"{label}: loss {loss.item()} at step {step}.")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _write_csv(records: Iterable[Any], fields: Iterable[str], path: str | os.PathLike) -> None:
    """The records (dataclasses with ``fields``) as a CSV file with a header row."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields))
        writer.writeheader()
        writer.writerows(asdict(r) for r in records)


def _save_figure(fig: Any, axes: Any, path: str | os.PathLike, title: str) -> None:
    """Legend on the top-right panel, optional title, then write and close the figure (no pyplot state left)."""
    import matplotlib.pyplot as plt

    axes[0][-1].legend(fontsize=6, loc="best")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _sweep(
    parametrizations: Sequence[str],
    sizes: Sequence[int],
    run: Callable[[str, int], list[Any]],
    describe: str,
    progress: Callable[[str], None] | None,
) -> list[Any]:
    """``run`` for every parametrization and size, in that nesting, each run's time reported to ``progress`` (the run
    named by ``describe``, a format string of ``p`` and ``size``)."""
    records: list[Any] = []
    for p in parametrizations:
        for size in sizes:
            start = time.perf_counter()
            records += run(p, size)
            if progress is not None:
                progress(f"coord-check {describe.format(p=p, size=size)} ({time.perf_counter() - start:.1f}s)")
    return records
