"""Minimal torch.distributed helpers for the contrastive losses.

Every function is a no-op (single-process behaviour) when torch.distributed is
unavailable, not initialised, or the world size is 1. Collectives use the default
process group. All ranks must call these functions in the same order with the
same ``with_grad`` choice, as usual for collectives.
"""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "world_info",
    "is_distributed",
    "all_reduce_sum",
    "gather_counts",
    "gather_rows",
]


def world_info() -> tuple[int, int]:
    """(rank, world_size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_distributed() -> bool:
    """True when an initialised process group has more than one rank."""
    return world_info()[1] > 1


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum of ``t`` over ranks (a new tensor, no autograd; ``t`` is untouched)."""
    out = t.detach().clone()
    if is_distributed():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def gather_counts(n: int, device: torch.device | str = "cpu") -> list[int]:
    """Row counts of every rank, in rank order (``[n]`` when not distributed).

    ``device`` must suit the backend (CUDA for NCCL, CPU for gloo).
    """
    if not is_distributed():
        return [int(n)]
    world = world_info()[1]
    local = torch.tensor([int(n)], dtype=torch.int64, device=device)
    out = [torch.zeros_like(local) for _ in range(world)]
    dist.all_gather(out, local)
    return [int(c.item()) for c in out]


def gather_rows(
    x: Tensor, *, with_grad: bool, counts: list[int] | None = None
) -> tuple[Tensor, list[int]]:
    """All-gather the rows of ``x`` [n, ...] from every rank, allowing unequal ``n``.

    Rows are padded to the max count, gathered, then stripped, so the result is the
    un-padded concatenation in rank order [sum(counts), ...] together with the
    per-rank counts. With ``with_grad`` the gather is differentiable
    (torch.distributed.nn.functional.all_gather: the backward sums the gradients
    of every rank into the owner's rows). Pass ``counts`` if already known to
    save one collective.
    """
    if not is_distributed():
        return x, [int(x.shape[0])]
    if counts is None:
        counts = gather_counts(x.shape[0], x.device)
    max_n = max(counts)
    if max_n == 0:
        return x, counts
    pad = max_n - x.shape[0]
    if pad > 0:
        x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))], dim=0)
    x = x.contiguous()
    if with_grad:
        from torch.distributed.nn.functional import all_gather as ag_with_grad

        with warnings.catch_warnings():  # deprecated in recent torch, still the autograd gather
            warnings.simplefilter("ignore", FutureWarning)
            parts = list(ag_with_grad(x))
    else:
        x = x.detach()
        parts = [torch.empty_like(x) for _ in counts]
        dist.all_gather(parts, x)
    return torch.cat([p[:c] for p, c in zip(parts, counts)], dim=0), counts
