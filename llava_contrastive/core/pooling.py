"""Pooling of token hidden states into one embedding per row, and caption keys."""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["masked_mean", "last_token", "pool", "caption_mask_from_labels", "caption_keys", "strip_trailing"]


def _check(x: Tensor, mask: Tensor) -> Tensor:
    if x.dim() != 3 or tuple(mask.shape) != tuple(x.shape[:2]):
        raise ValueError(f"expected x [B, T, D] and mask [B, T], got {tuple(x.shape)} and {tuple(mask.shape)}")
    return mask.to(device=x.device, dtype=torch.bool)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of x [B, T, D] over positions where mask [B, T] is True -> [B, D].
    Rows without any valid token give zeros. Accumulates in float32 (or wider)."""
    m = _check(x, mask)
    acc = torch.promote_types(x.dtype, torch.float32)
    # a batched matmul: no [B, T, D] temporary (576 image tokens x 4096 at 7B)
    total = torch.bmm(m.to(x.dtype).unsqueeze(1), x).squeeze(1).to(acc)
    count = m.sum(1, keepdim=True).to(acc).clamp_min(1.0)
    return (total / count).to(x.dtype)


def last_token(x: Tensor, mask: Tensor) -> Tensor:
    """x at the last True position of each row -> [B, D] (right or left padding).
    Rows without any valid token give zeros."""
    m = _check(x, mask)
    if x.shape[1] == 0:
        return x.new_zeros(x.shape[0], x.shape[2])
    pos = torch.arange(x.shape[1], device=x.device)
    last = (pos * m).amax(1)  # 0 for rows without tokens (masked out below)
    out = x[torch.arange(x.shape[0], device=x.device), last]
    return torch.where(m.any(1, keepdim=True), out, torch.zeros_like(out))


def pool(x: Tensor, mask: Tensor, how: str) -> Tensor:
    """Dispatch: "mean" -> masked_mean, "last" -> last_token."""
    if how == "mean":
        return masked_mean(x, mask)
    if how == "last":
        return last_token(x, mask)
    raise ValueError(f"unknown pooling {how!r}; expected 'mean' or 'last'")


def caption_mask_from_labels(labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Bool mask of supervised (caption) tokens: labels != ignore_index."""
    return labels != ignore_index


# Two 31-bit prime moduli: all products stay below 2^63 in int64.
_P1, _P2 = 2147483647, 2147483629
_B1, _B2 = 1000003, 916969


def _powmod(base: int, e: Tensor, p: int) -> Tensor:
    """base ** e mod p element-wise for int64 e >= 0 (binary exponentiation)."""
    result = torch.ones_like(e)
    b = torch.tensor(base % p, dtype=torch.long, device=e.device)
    e = e.clone()
    for _ in range(int(e.max()).bit_length() if e.numel() else 0):  # one device sync, not one per bit
        odd = (e & 1).bool()
        result = torch.where(odd, result * b % p, result)
        b = b * b % p
        e = e >> 1
    return result


def _poly_hash(tok: Tensor, m: Tensor, exp: Tensor, base: int, p: int) -> Tensor:
    terms = (tok % p) * _powmod(base, exp, p) % p  # each < 2^31
    return (terms * m).sum(1) % p  # sum of < 2^32 terms of < 2^31: no overflow


def caption_keys(ids: Tensor, mask: Tensor) -> Tensor:
    """Deterministic int64 key [B] of the masked token sequence of each row.

    Same tokens in the same order -> same key, whatever the padding side or
    position offset. Double polynomial hash (mod two 31-bit primes) combined into
    one non-negative int64; tokens are shifted by +1 so leading id 0 matters.
    Rows without tokens get key 0.
    """
    if ids.dim() != 2 or tuple(mask.shape) != tuple(ids.shape):
        raise ValueError(f"expected ids and mask [B, T], got {tuple(ids.shape)} and {tuple(mask.shape)}")
    m = mask.to(device=ids.device, dtype=torch.bool).long()
    tok = ids.long() + 1
    ordinal = m.cumsum(1) - 1  # index among the valid tokens of the row
    length = m.sum(1, keepdim=True)
    exp = ((length - 1 - ordinal) * m).clamp_min(0)  # Horner exponent; 0 on padding
    h1 = _poly_hash(tok, m, exp, _B1, _P1)
    h2 = _poly_hash(tok, m, exp, _B2, _P2)
    return h1 * _P2 + h2


def strip_trailing(ids: Tensor, mask: Tensor, drop: Tensor) -> Tensor:
    """Remove trailing masked tokens whose id is in ``drop`` (keep at least one token)."""
    if drop.numel() == 0:
        return mask
    is_drop = torch.isin(ids, drop) & mask
    keep = mask & ~is_drop
    # a token is kept if it is not droppable or a non-droppable caption token follows it
    later_keep = torch.flip(torch.cumsum(torch.flip(keep.int(), [1]), 1), [1]) > 0
    stripped = mask & (keep | later_keep)
    return torch.where(stripped.any(dim=1, keepdim=True), stripped, mask)
