"""Image-text alignment metrics (no autograd, chunked so that N x N never exists).

Pairs are 1:1 on the diagonal: image i matches text i. Similarities are cosine,
computed in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "modality_gap",
    "retrieval_recall",
    "positive_negative_cosine",
    "in_batch_accuracy",
    "alignment_report",
]


def _normed(image: Tensor, text: Tensor) -> tuple[Tensor, Tensor]:
    if image.dim() != 2 or image.shape != text.shape:
        raise ValueError(f"expected paired [N, D] embeddings, got {tuple(image.shape)} and {tuple(text.shape)}")
    if image.shape[0] == 0:
        raise ValueError("metrics need at least one pair")
    ct = torch.promote_types(torch.promote_types(image.dtype, text.dtype), torch.float32)
    return F.normalize(image.detach().to(ct), dim=-1), F.normalize(text.detach().to(ct), dim=-1)


@torch.no_grad()
def modality_gap(image_embeds: Tensor, text_embeds: Tensor) -> float:
    """Liang et al. 2022: || mean(normalise(image)) - mean(normalise(text)) ||."""
    img, txt = _normed(image_embeds, text_embeds)
    return float((img.mean(0) - txt.mean(0)).norm())


def _ranks(queries: Tensor, cands: Tensor, keys: Tensor | None, chunk_size: int) -> Tensor:
    """Rank of each query's true candidate (same index): number of candidates with
    strictly greater similarity, skipping candidates sharing the query's key."""
    n = queries.shape[0]
    out = torch.empty(n, dtype=torch.long, device=queries.device)
    for a in range(0, n, chunk_size):
        b = min(a + chunk_size, n)
        sims = queries[a:b] @ cands.T  # [c, N]
        rows = torch.arange(b - a, device=sims.device)
        pos = sims[rows, rows + a]  # taken from the same matmul so exact ties stay ties
        better = sims > pos[:, None]
        if keys is not None:
            better &= keys[a:b, None] != keys[None, :]
        out[a:b] = better.sum(1)
    return out


@torch.no_grad()
def retrieval_recall(
    image_embeds: Tensor,
    text_embeds: Tensor,
    ks: Sequence[int] = (1, 5, 10),
    *,
    duplicate_keys: Tensor | None = None,
    chunk_size: int = 4096,
) -> dict[str, float]:
    """Recall@k for image->text ("i2t@k") and text->image ("t2i@k").

    A query hits at k when fewer than k candidates are strictly more similar than
    its true pair (ties favour the true pair). With ``duplicate_keys`` [N],
    candidates sharing the query's key are ignored (a duplicate caption is no miss).
    Memory O(chunk_size x N).
    """
    if chunk_size <= 0:
        raise ValueError("chunk_size must be > 0")
    img, txt = _normed(image_embeds, text_embeds)
    keys = None if duplicate_keys is None else duplicate_keys.to(img.device, torch.long)
    out: dict[str, float] = {}
    for name, q, c in (("i2t", img, txt), ("t2i", txt, img)):
        ranks = _ranks(q, c, keys, chunk_size)
        for k in ks:
            out[f"{name}@{k}"] = float((ranks < k).double().mean())
    return out


@torch.no_grad()
def positive_negative_cosine(
    image_embeds: Tensor, text_embeds: Tensor, chunk_size: int = 4096
) -> dict[str, float]:
    """Mean cosine of true pairs ("pos_mean") and of all off-diagonal pairs
    ("neg_mean"; NaN when N == 1).

    The off-diagonal sum is (sum_i img_i) . (sum_j txt_j) - sum_i img_i . txt_i,
    accumulated in float64 over chunks of ``chunk_size`` rows.
    """
    img, txt = _normed(image_embeds, text_embeds)
    n = img.shape[0]
    sum_img = torch.zeros(img.shape[1], dtype=torch.float64, device=img.device)
    sum_txt = torch.zeros_like(sum_img)
    pos_sum = torch.zeros((), dtype=torch.float64, device=img.device)
    for a in range(0, n, max(1, chunk_size)):
        i, t = img[a : a + chunk_size].double(), txt[a : a + chunk_size].double()
        sum_img += i.sum(0)
        sum_txt += t.sum(0)
        pos_sum += (i * t).sum()
    neg = (sum_img @ sum_txt - pos_sum) / (n * (n - 1)) if n > 1 else torch.tensor(float("nan"))
    return {"pos_mean": float(pos_sum / n), "neg_mean": float(neg)}


@torch.no_grad()
def in_batch_accuracy(
    image_embeds: Tensor, text_embeds: Tensor, chunk_size: int = 4096
) -> dict[str, float]:
    """Fraction of rows whose argmax similarity is the diagonal ("i2t", "t2i").
    Ties resolve to the lowest index (torch.argmax)."""
    img, txt = _normed(image_embeds, text_embeds)
    out: dict[str, float] = {}
    for name, q, c in (("i2t", img, txt), ("t2i", txt, img)):
        hits = 0
        for a in range(0, q.shape[0], max(1, chunk_size)):
            sims = q[a : a + chunk_size] @ c.T
            idx = torch.arange(a, a + sims.shape[0], device=sims.device)
            hits += int((sims.argmax(1) == idx).sum())
        out[name] = hits / q.shape[0]
    return out


@torch.no_grad()
def alignment_report(
    image_embeds: Tensor,
    text_embeds: Tensor,
    ks: Sequence[int] = (1, 5, 10),
    duplicate_keys: Tensor | None = None,
    chunk_size: int = 4096,
) -> dict[str, float]:
    """All metrics in one flat dict: "i2t@k", "t2i@k", "pos_mean", "neg_mean",
    "acc_i2t", "acc_t2i", "modality_gap" and "n"."""
    out: dict[str, float] = dict(
        retrieval_recall(image_embeds, text_embeds, ks, duplicate_keys=duplicate_keys, chunk_size=chunk_size)
    )
    out.update(positive_negative_cosine(image_embeds, text_embeds, chunk_size))
    acc = in_batch_accuracy(image_embeds, text_embeds, chunk_size)
    out["acc_i2t"], out["acc_t2i"] = acc["i2t"], acc["t2i"]
    out["modality_gap"] = modality_gap(image_embeds, text_embeds)
    out["n"] = float(image_embeds.shape[0])
    return out
