"""Text corpus → ``datasets.Dataset`` of fixed-length token blocks, with no tokenizer download.

The default corpus is the tiny Shakespeare text bundled with the package (``hf_optim/data/tinyshakespeare.txt``,
about 1.1 MB). Two tokenizers that need no files:

- ``char``: one id per distinct character of the corpus (65 for tiny Shakespeare), ids in sorted-character order;
- ``byte``: the UTF-8 bytes (vocabulary 256), which works for any text.

The token stream is cut into non-overlapping blocks of ``block_size`` tokens; the last ``val_fraction`` of the
*stream* (not a random sample of blocks) is the validation split, so validation text is never seen in training.
Each row is ``{"input_ids": [...], "labels": [...]}`` with ``labels == input_ids``: HF causal-LM models shift labels
themselves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from hf_optim import _validation as v

TOKENIZERS = ("char", "byte")
BUNDLED = {"tinyshakespeare": "tinyshakespeare.txt"}


@dataclass(frozen=True)
class Corpus:
    """The tokenized blocks and what is needed to decode them."""

    train: datasets.Dataset  # noqa: F821 - imported lazily
    val: datasets.Dataset  # noqa: F821
    vocab_size: int
    tokenizer: str
    chars: str  # the char vocabulary ('' for byte level)

    def decode(self, ids: list[int]) -> str:
        if self.tokenizer == "byte":
            return bytes(ids).decode("utf-8", errors="replace")
        return "".join(self.chars[i] for i in ids)


def read_text(corpus: str) -> str:
    """A bundled corpus name (``tinyshakespeare``) or the path of a UTF-8 text file."""
    if corpus in BUNDLED:
        return resources.files("hf_optim").joinpath("data", BUNDLED[corpus]).read_text(encoding="utf-8")
    path = Path(corpus).expanduser()
    if not path.is_file():
        raise ValueError(
            f"data.corpus must be one of {list(BUNDLED)} or the path of a text file, got {corpus!r} "
            f"(no such file).{v.closest(corpus, BUNDLED)}"
        )
    return path.read_text(encoding="utf-8")


def tokenize(text: str, tokenizer: str) -> tuple[np.ndarray, int, str]:
    """Token ids (int64), vocabulary size and the char table (empty for bytes)."""
    v.check_choice("data.tokenizer", tokenizer, TOKENIZERS)
    if tokenizer == "byte":
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64), 256, ""
    chars = "".join(sorted(set(text)))
    lookup = {c: i for i, c in enumerate(chars)}
    return np.fromiter((lookup[c] for c in text), dtype=np.int64, count=len(text)), len(chars), chars


def _round_up(x: float, digits: int = 2) -> float:
    """``x`` rounded *up* to ``digits`` significant digits, so a suggested minimum is really enough."""
    scale = 10.0 ** (digits - 1 - math.floor(math.log10(x)))
    return math.ceil(x * scale) / scale


def load_corpus(
    corpus: str = "tinyshakespeare",
    *,
    tokenizer: str = "char",
    block_size: int = 128,
    val_fraction: float = 0.1,
    max_tokens: int | None = None,
) -> Corpus:
    """Load, tokenize and block a corpus into train/val ``datasets.Dataset`` objects (see the module docstring).

    ``max_tokens`` truncates the stream first (tests and quick demos).
    """
    import datasets

    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise ValueError(f"data.block_size must be an integer >= 2, got {block_size!r}.")
    v.check_unit_interval("data.val_fraction", val_fraction)
    ids, vocab_size, chars = tokenize(read_text(corpus), tokenizer)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n_val = int(len(ids) * val_fraction)
    splits = {"train": ids[: len(ids) - n_val], "val": ids[len(ids) - n_val :]}
    out = {}
    for split, stream in splits.items():
        n_blocks = len(stream) // block_size
        if split == "train" and n_blocks == 0:
            raise ValueError(
                f"corpus {corpus!r} has {len(stream)} training tokens, fewer than one block of "
                f"data.block_size={block_size}."
            )
        if split == "val" and n_blocks == 0:
            # Training evaluates at step 0 and at the end: an empty split would only fail later, as a KeyError
            # on 'eval_loss' inside the Trainer.
            need = _round_up(block_size / len(ids)) if len(ids) else math.inf
            # ... while the training split keeps at least one block too
            fix = (
                f"use data.val_fraction >= {need:g}"
                if need + block_size / len(ids) <= 1
                else "use a larger corpus or data.max_tokens, or a smaller data.block_size"
            )
            raise ValueError(
                f"data.val_fraction={val_fraction!r} leaves {len(stream)} validation tokens of "
                f"{len(ids)}, fewer than one block of data.block_size={block_size}; the validation "
                f"split needs at least one block: {fix}."
            )
        blocks = stream[: n_blocks * block_size].reshape(n_blocks, block_size).tolist()
        out[split] = datasets.Dataset.from_dict({"input_ids": blocks, "labels": blocks})
    return Corpus(out["train"], out["val"], vocab_size, tokenizer, chars)
