"""Sharding-aware reductions for optimizers whose update needs statistics over whole tensors (Adafactor).

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) each parameter is a ``DTensor`` whose local tensor is a slice
along one dim (``Shard(0)``) on each rank of a mesh dimension. Element-wise maths can run on the local slices; a mean
over a *sharded* dim (Adafactor's column statistics, the RMS of a parameter or update) is a local sum plus an
all-reduce over that mesh dimension's process group, divided by the global size. Only the reduced statistics
travel (O(rows + cols) values per matrix); parameters and gradients are never gathered.

Replicated placements (DDP, or ``Replicate`` mesh dims of HSDP) need nothing: every rank already holds the same
gradient. ``Partial`` placements (unreduced gradients) are rejected.

DeepSpeed ZeRO and FSDP1 without ``use_orig_params=True`` hand the optimizer flat 1-D partitions that mix many
parameters: their matrix shape is gone, so factoring is impossible there; :func:`check_factorable` says so.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

#: A parameter set of only 1-D tensors with one this large looks like a flat partition, not biases/norm scales.
FLAT_PARTITION_NUMEL: int = 1 << 20


@dataclass(frozen=True)
class ShardSpec:
    """How one parameter is split: its global shape and, per sharded mesh dim, (tensor dim, process group)."""

    global_shape: torch.Size
    sharded: tuple[tuple[int, Any], ...]

    def groups_for(self, dims: Iterable[int]) -> list[Any]:
        """Process groups to all-reduce over when summing over tensor ``dims`` (non-negative indices)."""
        wanted = set(dims)
        return [group for dim, group in self.sharded if dim in wanted]


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "placements")


def shard_spec(p: torch.Tensor) -> ShardSpec | None:
    """``None`` for an ordinary (or fully replicated) tensor; the sharding of a ``DTensor`` otherwise."""
    if not _is_dtensor(p):
        return None
    sharded = []
    mesh = p.device_mesh
    for mesh_dim, placement in enumerate(p.placements):
        if placement.is_replicate():
            continue
        if placement.is_shard() and type(placement).__name__ == "Shard":
            if mesh.size(mesh_dim) > 1:
                sharded.append((placement.dim % p.ndim, mesh.get_group(mesh_dim)))
            continue
        raise ValueError(
            f"Adafactor supports DTensor parameters sharded with Shard(dim) or replicated (FSDP2, DDP, HSDP); "
            f"got placements {tuple(p.placements)}. Partial/strided placements must be redistributed first."
        )
    return ShardSpec(p.shape, tuple(sharded)) if sharded else None


def rows_shard_whole(p: torch.Tensor) -> bool:
    """Whether every shard of ``p`` holds whole rows (first-dim slices) of a matrix: an ordinary tensor, or a DTensor
    that is replicated or sharded only along dim 0 of a tensor of at least 2 dims (FSDP2's default ``Shard(0)``).
    Per-row statistics of such a tensor (the block scales of a quantised state) can be computed shard by shard."""
    if not _is_dtensor(p):
        return True
    mesh = p.device_mesh
    for mesh_dim, placement in enumerate(p.placements):
        if placement.is_replicate() or mesh.size(mesh_dim) == 1:
            continue
        if not (placement.is_shard() and type(placement).__name__ == "Shard" and placement.dim % p.ndim == 0):
            return False
        if p.ndim < 2:
            return False
    return True


def sharded_like(local_tensor: torch.Tensor, ref: torch.Tensor, global_shape: Sequence[int]) -> torch.Tensor:
    """``local_tensor`` as a DTensor of ``global_shape`` placed as the DTensor ``ref`` (the rows of this rank)."""
    from torch.distributed.tensor import DTensor

    shape = torch.Size(global_shape)
    stride, size = [], 1
    for dim in reversed(shape):
        stride.insert(0, size)
        size *= max(dim, 1)
    return DTensor.from_local(
        local_tensor, ref.device_mesh, ref.placements, run_check=False, shape=shape, stride=tuple(stride)
    )


def is_dtensor(t: object) -> bool:
    return torch.is_tensor(t) and _is_dtensor(t)


def local(t: torch.Tensor) -> torch.Tensor:
    """The local tensor of a DTensor (sharing storage, so in-place updates reach the parameter); else ``t``."""
    return t.to_local() if _is_dtensor(t) else t


def all_reduce_sum_(tensor: torch.Tensor, groups: Sequence[Any]) -> torch.Tensor:
    """Sum ``tensor`` in place over each process group (a no-op without groups)."""
    if groups:
        import torch.distributed as dist

        for group in groups:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def mean_over(x: torch.Tensor, dim: int, spec: ShardSpec | None, *, keepdim: bool = True) -> torch.Tensor:
    """Mean of ``x`` over ``dim`` as if the tensor were whole (``dim`` is a non-negative index of ``x``)."""
    if spec is None or not spec.groups_for([dim]):
        return x.mean(dim=dim, keepdim=keepdim)
    total = x.sum(dim=dim, keepdim=keepdim)
    all_reduce_sum_(total, spec.groups_for([dim]))
    return total.div_(spec.global_shape[dim])


def global_numel(x: torch.Tensor, spec: ShardSpec | None) -> int:
    return x.numel() if spec is None else spec.global_shape.numel()


_FACTORING_IMPOSSIBLE = (
    "Adafactor cannot factor its second moment here: the optimizer sees {}. Factoring needs each parameter's "
    "matrix shape. Keep original shapes (FSDP2 fully_shard, FSDP1 use_orig_params=True), or use factored=False "
    "(e.g. preset='palm') or AdamW."
)


def factoring_impossible(what: str) -> ValueError:
    """The one error for "these tensors lost their matrix shape", at construction and at the first step alike."""
    return ValueError(_FACTORING_IMPOSSIBLE.format(what))


def check_factorable(params: Iterable[Any], *, strict: bool = True) -> list[str]:
    """Say whether the parameters still have their matrix shapes, so a factored second moment is possible.

    FSDP1 ``FlatParameter``s (``use_orig_params=False``) and DeepSpeed-managed parameters are certain problems: they
    raise ``ValueError`` (or, with ``strict=False``, are returned and warned about). A set of only 1-D tensors, one
    with at least 2**20 elements, *looks* like a flat partition (DeepSpeed ZeRO hands plain 1-D fp32 partitions to
    the optimizer): that only warns, because a 1-D tensor that was once a matrix cannot be recognised in general.
    The fix in all cases: keep original shapes (FSDP2 ``fully_shard``, FSDP1 ``use_orig_params=True``), or use an
    unfactored optimizer (``Adafactor(preset="palm")``, ``factored=False``, or AdamW). Returns the problems found.
    """
    tensors: list[torch.Tensor] = []
    for item in params:
        if isinstance(item, dict):
            tensors.extend(item["params"] if not isinstance(item["params"], torch.Tensor) else [item["params"]])
        else:
            tensors.append(item)
    problems = []
    for t in tensors:
        if type(t).__name__ == "FlatParameter" or getattr(t, "_is_flat_param", False):
            problems.append(
                f"a FlatParameter of {t.numel()} elements (FSDP1 with use_orig_params=False: pass "
                "use_orig_params=True, or use FSDP2 fully_shard)"
            )
        elif any(hasattr(t, attr) for attr in ("ds_id", "ds_numel", "ds_tensor")):
            problems.append(f"a DeepSpeed-managed parameter (ds_id={getattr(t, 'ds_id', '?')})")
    if problems:
        text = "; ".join(problems[:3]) + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "")
        if strict:
            raise factoring_impossible(text)
        warnings.warn(_FACTORING_IMPOSSIBLE.format(text), UserWarning, stacklevel=2)
    elif tensors and all(t.ndim <= 1 for t in tensors) and max(t.numel() for t in tensors) >= FLAT_PARTITION_NUMEL:
        biggest = max(t.numel() for t in tensors)
        problems.append(f"only 1-D tensors, the largest with {biggest} elements (a flat partition?)")
        warnings.warn(
            _FACTORING_IMPOSSIBLE.format(problems[-1]) + " If these really are vectors, ignore this warning.",
            UserWarning,
            stacklevel=2,
        )
    return problems
