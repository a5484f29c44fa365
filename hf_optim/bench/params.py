"""LLaMA-shaped parameter sets for the benchmark: plain tensors with a decoder's shapes, not a model.

An optimizer step only sees a list of tensors and their gradients, so building the model is unnecessary; what matters
for speed is the mix of shapes (two large vocab matrices, many square and rectangular projections, small norm
vectors) because it decides how much per-tensor overhead and how much streaming work a step has.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LlamaShape:
    """Sizes of a LLaMA-style decoder with an untied output head."""

    hidden: int
    layers: int
    intermediate: int
    vocab: int

    def shapes(self) -> list[tuple[int, ...]]:
        """Parameter shapes in ``LlamaForCausalLM.named_parameters()`` order."""
        h, f = self.hidden, self.intermediate
        out: list[tuple[int, ...]] = [(self.vocab, h)]  # embed_tokens
        for _ in range(self.layers):
            out += [(h, h)] * 4  # q, k, v, o projections (as many kv heads as heads)
            out += [(f, h), (f, h), (h, f)]  # gate, up, down
            out += [(h,), (h,)]  # input and post-attention RMSNorm
        out += [(h,), (self.vocab, h)]  # final norm, lm_head (untied)
        return out

    def numel(self) -> int:
        total = 0
        for shape in self.shapes():
            n = 1
            for d in shape:
                n *= d
            total += n
        return total


#: ``--size`` choices. ``58m`` is the reference set of the issues; ``1b`` is meant for GPUs; ``tiny`` for tests.
SIZES: dict[str, LlamaShape] = {
    "tiny": LlamaShape(hidden=32, layers=2, intermediate=88, vocab=256),
    "58m": LlamaShape(hidden=512, layers=8, intermediate=1376, vocab=32000),
    "350m": LlamaShape(hidden=1024, layers=24, intermediate=2752, vocab=32000),
    "1b": LlamaShape(hidden=2048, layers=16, intermediate=5504, vocab=32000),
}


def make_params(
    size: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0
) -> list[torch.Tensor]:
    """Leaf tensors (``requires_grad=True``) of the ``size`` set with fixed random gradients attached.

    Values are small (std 0.02, gradients std 1e-3) so that no optimizer produces inf/NaN or denormals during a
    benchmark, which would distort timings.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    params = []
    for shape in SIZES[size].shapes():
        # Generate on CPU for a device-independent stream, then move.
        p = (torch.randn(shape, generator=gen) * 0.02).to(device=device, dtype=dtype).requires_grad_()
        p.grad = (torch.randn(shape, generator=gen) * 1e-3).to(device=device, dtype=dtype)
        params.append(p)
    return params
