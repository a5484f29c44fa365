"""Character-level tiny Shakespeare for the sweeps: ``hf_optim.runner.data``'s char tokenizer, sampled as seeded random windows.

Every cell of a sweep with the same seed sees the same batches (the batch stream depends only on the seed), so the
differences between learning rates or widths are not drowned in data-order noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from .data import read_text, tokenize


@lru_cache(maxsize=1)
def _encoded() -> tuple[torch.Tensor, int]:
    # Random windows (not hf_optim.runner.data's fixed blocks): a fresh batch stream per seed at no pre-blocking cost.
    ids, vocab, _ = tokenize(read_text("tinyshakespeare"), "char")
    return torch.from_numpy(ids), vocab


def vocab_size() -> int:
    return _encoded()[1]


@dataclass
class CharData:
    """Train/validation split of the corpus (the last ``val_fraction`` is held out).

    ``train_chars`` (optional) keeps only the first N training characters: a small training set makes the model
    overfit within a few hundred steps, which is the regime where weight decay has an interior optimum.
    """

    seq_len: int
    batch_size: int
    val_fraction: float = 0.1
    train_chars: int | None = None

    def __post_init__(self) -> None:
        ids, _ = _encoded()
        split = int(len(ids) * (1.0 - self.val_fraction))
        self.train = ids[:split] if self.train_chars is None else ids[: min(split, self.train_chars)]
        self.val = ids[split:]
        if len(self.train) <= self.seq_len + 1:
            raise ValueError(f"train_chars={self.train_chars} is too small for seq_len={self.seq_len}.")

    def _windows(self, source: torch.Tensor, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        offsets = starts[:, None] + torch.arange(self.seq_len + 1)[None, :]
        chunk = source[offsets]
        return chunk[:, :-1], chunk[:, 1:]

    def train_batches(self, seed: int):
        """An endless stream of (inputs, targets) windows drawn uniformly from the training text."""
        generator = torch.Generator().manual_seed(seed)
        high = len(self.train) - self.seq_len - 1
        while True:
            yield self._windows(self.train, torch.randint(0, high, (self.batch_size,), generator=generator))

    def val_batches(self, n_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Fixed, evenly spaced validation windows (identical for every cell)."""
        total = n_batches * self.batch_size
        high = len(self.val) - self.seq_len - 1
        starts = torch.linspace(0, high, total).long()
        return [self._windows(self.val, s) for s in starts.split(self.batch_size)]
