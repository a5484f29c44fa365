r"""Orthogonalising an update matrix for Muon: Newton-Schulz iterations, an exact SVD reference, the lr adjustment.

For a matrix :math:`G = U \Sigma V^\top` Muon steps along :math:`U V^\top` (the nearest semi-orthogonal matrix,
the steepest-descent direction under the spectral norm; Bernstein & Newhouse 2024). Newton-Schulz approximates it
with a few matrix products: after scaling :math:`X_0 = G / \lVert G \rVert_F` (so every singular value is <= 1),

.. math::
   A_k = X_k X_k^\top, \qquad X_{k+1} = a X_k + (b A_k + c A_k^2) X_k,

with Keller Jordan's quintic coefficients :math:`(a, b, c) = (3.4445, -4.7750, 2.0315)`, which push singular values
into roughly [0.7, 1.2] in 5 steps rather than converging exactly. The iteration runs on the wide orientation
(rows <= columns, so :math:`A_k` is the smaller Gram matrix) in ``dtype`` (bfloat16 by default, as in torch.optim.Muon
and Keller Jordan's code; float32 for runs that must agree across shardings to 1e-6).

References:
    Jordan et al. (2024), *Muon: An optimizer for hidden layers in neural networks*, kellerjordan.github.io/posts/muon.
    Liu et al. (2025), *Muon is Scalable for LLM Training* (Moonlight), arXiv 2502.16982: update scale 0.2·sqrt(max(A, B)).
    Yang, Simon & Bernstein (2023), *A Spectral Condition for Feature Learning*, arXiv 2310.17813: sqrt(fan_out/fan_in).
"""

from __future__ import annotations

import math

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
ADJUSTMENTS = ("original", "rms", "spectral")
METHODS = ("newton_schulz", "svd")
NS_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


def as_matrices(x: torch.Tensor) -> torch.Tensor:
    """The matrices Muon orthogonalises in a parameter-shaped tensor: a 2-D tensor itself; a 3-D one (stacked MoE
    experts, per-head weights) as a batch along dim 0; 4-D and up (convolutions) as ``(out, in * kernel)``."""
    if x.dim() == 2 or x.dim() == 3:
        return x
    return x.reshape(x.shape[0], -1)


def matrix_shape(shape: torch.Size) -> tuple[int, int]:
    """``(A, B)`` = (rows, columns) of each matrix of a parameter of this shape (see :func:`as_matrices`)."""
    if len(shape) == 2 or len(shape) == 3:
        return int(shape[-2]), int(shape[-1])
    return int(shape[0]), int(math.prod(shape[1:]))


#: The largest singular value the iteration may make of one in (0, 1] (the input is normalised to that range): the
#: default quintic stays within [0.68, 1.13]; coefficients beyond this bound diverge (inf / nan weights).
NS_MAX_GAIN = 10.0


def iterated_gain(coefficients: tuple[float, float, float], steps: int) -> float:
    r"""The largest :math:`|p^{(steps)}(\sigma)|` over :math:`\sigma \in [10^{-6}, 1]`, :math:`p(\sigma) = a\sigma +
    b\sigma^3 + c\sigma^5`: what ``steps`` iterations do to a singular value (float64, a log-spaced grid)."""
    a, b, c = coefficients
    s = torch.logspace(-6, 0, 2001, dtype=torch.float64)
    for _ in range(steps):
        s = a * s + b * s**3 + c * s**5
        s = torch.nan_to_num(s, nan=math.inf, posinf=math.inf, neginf=-math.inf).clamp(-1e30, 1e30)
    return float(s.abs().max())


def newton_schulz(
    g: torch.Tensor, *, steps: int, coefficients: tuple[float, float, float], eps: float, dtype: torch.dtype
) -> torch.Tensor:
    """Newton-Schulz orthogonalisation of a matrix (2-D) or of each matrix of a batch (3-D), in ``dtype``.

    The 2-D path performs torch.optim.Muon's operations in the same order (``addmm``), so the two agree bitwise.
    """
    a, b, c = coefficients
    x = g.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    if x.dim() == 2:
        x = x / x.norm().clamp(min=eps)
        for _ in range(steps):
            gram = x @ x.mT
            poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
            x = torch.addmm(x, poly, x, beta=a)
    else:
        x = x / torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp(min=eps)
        for _ in range(steps):
            gram = x @ x.mT
            poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
            x = torch.baddbmm(x, poly, x, beta=a)
    return x.mT if tall else x


def svd_orthogonalize(g: torch.Tensor) -> torch.Tensor:
    """Exact :math:`U V^\\top` in float64. Singular values below the rank tolerance of the *input's* precision
    (``max(A, B) * eps(g.dtype) * s_max``, as ``numpy.linalg.matrix_rank``) count as 0: a zero or rank-deficient
    matrix is not given directions it does not have, and the directions of singular values that are rounding noise
    (arbitrary, so two LAPACK calls on equal inputs may disagree on them) are left out."""
    u, s, vh = torch.linalg.svd(g.to(torch.float64), full_matrices=False)
    if s.numel():
        eps = torch.finfo(g.dtype if g.dtype.is_floating_point else torch.float64).eps
        tol = s.amax(dim=-1, keepdim=True) * max(g.shape[-2:]) * eps
        u = u * (s > tol).to(u.dtype).unsqueeze(-2)
    return u @ vh


def orthogonalize(
    update: torch.Tensor,
    *,
    method: str,
    steps: int,
    coefficients: tuple[float, float, float],
    eps: float,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The orthogonalised ``update`` (parameter-shaped, in ``update.dtype``)."""
    if update.numel() == 0:
        return torch.zeros_like(update)
    matrices = as_matrices(update)
    if method == "svd":
        out = svd_orthogonalize(matrices)
    else:
        out = newton_schulz(matrices, steps=steps, coefficients=coefficients, eps=eps, dtype=dtype)
    return out.reshape(update.shape).to(update.dtype)


def lr_scale(adjust: str, shape: torch.Size) -> float:
    """The factor Muon multiplies the lr by for a parameter of ``shape``, per matrix of shape ``(A, B)``:

    - ``original``: ``sqrt(max(1, A / B))`` (Keller Jordan; torch.optim.Muon's default);
    - ``rms``: ``0.2 * sqrt(max(A, B))``: the update's RMS is 0.2·lr, AdamW's typical update RMS, so AdamW's lr and
      weight decay carry over (Moonlight; torch's ``adjust_lr_fn="match_rms_adamw"``);
    - ``spectral``: ``sqrt(A / B)`` = sqrt(fan_out / fan_in) for an ``nn.Linear`` weight (out, in): the update's
      spectral norm follows the spectral condition for feature learning (Yang, Simon & Bernstein 2023).
    """
    rows, cols = matrix_shape(shape)
    if rows == 0 or cols == 0:
        return 0.0
    if adjust == "original":
        return math.sqrt(max(1.0, rows / cols))
    if adjust == "rms":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(rows / cols)
