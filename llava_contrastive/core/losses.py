"""Contrastive image-text losses (CLIP InfoNCE and SigLIP) with optional
cross-rank negatives.

Distributed semantics (torch.distributed initialised, world > 1, ``gather=True``):
each rank scores its local rows against the columns gathered from all ranks.
The returned value is ``world * local_sum / N`` (N = global row count, times 2
for the two InfoNCE directions), so that the mean over ranks is the loss of the
rank-ordered global batch, and DDP's gradient averaging yields the global
gradient. Ranks may hold different numbers of rows (including zero). When the
global batch has fewer than 2 rows every rank returns a graph-connected zero
without entering the gather.

Gathers are differentiable for a side that requires grad and plain (no
autograd) otherwise; all ranks must agree on which sides require grad.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from llava_contrastive.core.distributed import gather_counts, gather_rows, world_info

__all__ = ["info_nce_loss", "siglip_loss"]

@functools.lru_cache(maxsize=64)
def _labels(size: int, offset: int, device: torch.device) -> Tensor:
    """Cached global column index of each local row's positive."""
    return torch.arange(offset, offset + size, dtype=torch.long, device=device)


@dataclass
class _Batch:
    """Normalised local embeddings plus the layout of the global batch."""

    img: Tensor  # [B, D] local, normalised, compute dtype
    txt: Tensor  # [B, D]
    ct: torch.dtype  # compute dtype
    distributed: bool  # gather across ranks
    world: int  # 1 unless distributed
    counts: list[int]  # rows per rank (rank order)
    offset: int  # global index of local row 0

    @property
    def n_global(self) -> int:
        return sum(self.counts)


def _as_scalar(x: Tensor | float, ct: torch.dtype, device: torch.device) -> Tensor:
    if isinstance(x, Tensor):
        return x.to(device=device, dtype=ct).reshape(())
    return torch.tensor(float(x), dtype=ct, device=device)


def _prepare(image: Tensor, text: Tensor, gather: bool, duplicate_keys: Tensor | None) -> _Batch:
    if image.dim() != 2 or text.dim() != 2 or image.shape != text.shape:
        raise ValueError(f"expected image/text embeddings of equal shape [B, D], got {tuple(image.shape)} and {tuple(text.shape)}")
    if duplicate_keys is not None and tuple(duplicate_keys.shape) != (image.shape[0],):
        raise ValueError(f"duplicate_keys must have shape [{image.shape[0]}], got {tuple(duplicate_keys.shape)}")
    ct = torch.promote_types(torch.promote_types(image.dtype, text.dtype), torch.float32)
    img = F.normalize(image.to(ct), dim=-1)
    txt = F.normalize(text.to(ct), dim=-1)
    rank, world = world_info()
    distributed = gather and world > 1
    if distributed:
        counts = gather_counts(image.shape[0], image.device)
        offset = sum(counts[:rank])
    else:
        counts, offset, world = [int(image.shape[0])], 0, 1
    return _Batch(img, txt, ct, distributed, world, counts, offset)


def _connected_zero(ct: torch.dtype, *tensors: Tensor | float | None) -> Tensor:
    """A zero that keeps every tensor input in the graph (zero gradients)."""
    out: Tensor | None = None
    for t in tensors:
        if isinstance(t, Tensor):
            term = t.sum().to(ct) * 0
            out = term if out is None else out + term
    assert out is not None
    return out


def _gather_cols(x: Tensor, b: _Batch, with_grad: bool) -> Tensor:
    if not b.distributed:
        return x
    return gather_rows(x, with_grad=with_grad, counts=b.counts)[0]


def _dup_mask(keys: Tensor | None, b: _Batch, labels: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """(local keys, [B, N] mask of same-key columns other than the positive)."""
    if keys is None:
        return None, None
    keys = keys.to(device=b.img.device, dtype=torch.long)
    keys_all = _gather_cols(keys, b, with_grad=False)
    mask = keys[:, None] == keys_all[None, :]
    mask[torch.arange(keys.shape[0], device=keys.device), labels] = False
    return keys, mask


def _info_nce_core(
    image_embeds: Tensor,
    text_embeds: Tensor,
    logit_scale: Tensor | float,
    *,
    gather: bool,
    duplicate_keys: Tensor | None,
    extra_text: Tensor | None = None,
    extra_keys: Tensor | None = None,
) -> Tensor:
    """Shared InfoNCE implementation; ``extra_text`` [K, D] (detached, identical on
    all ranks) adds image->text negatives, masked where ``extra_keys`` equals the
    row's key."""
    b = _prepare(image_embeds, text_embeds, gather, duplicate_keys)
    n_extra = 0 if extra_text is None else int(extra_text.shape[0])
    n = b.n_global
    # Decided from globally agreed values only: no rank enters a collective alone.
    if n == 0 or (n < 2 and n_extra == 0):
        return _connected_zero(b.ct, image_embeds, text_embeds, logit_scale)
    scale = _as_scalar(logit_scale, b.ct, b.img.device)
    img_grad = b.img.requires_grad
    txt_all = _gather_cols(b.txt, b, with_grad=b.txt.requires_grad)
    img_all = _gather_cols(b.img, b, with_grad=img_grad)
    labels = _labels(b.img.shape[0], b.offset, b.img.device)
    keys, mask = _dup_mask(duplicate_keys, b, labels)

    logits_i2t = scale * (b.img @ txt_all.T)  # [B, N]
    logits_t2i = scale * (b.txt @ img_all.T)  # [B, N]
    if mask is not None:
        logits_i2t = logits_i2t.masked_fill(mask, float("-inf"))
        logits_t2i = logits_t2i.masked_fill(mask, float("-inf"))
    if n_extra:
        assert extra_text is not None
        q = F.normalize(extra_text.detach().to(device=b.img.device, dtype=b.ct), dim=-1)
        logits_q = scale * (b.img @ q.T)  # [B, K]
        if keys is not None and extra_keys is not None:
            qmask = keys[:, None] == extra_keys.to(keys.device, torch.long)[None, :]
            logits_q = logits_q.masked_fill(qmask, float("-inf"))
        logits_i2t = torch.cat([logits_i2t, logits_q], dim=1)
    total = F.cross_entropy(logits_i2t, labels, reduction="sum") + F.cross_entropy(
        logits_t2i, labels, reduction="sum"
    )
    return total * (b.world / (2.0 * n))


def info_nce_loss(
    image_embeds: Tensor,
    text_embeds: Tensor,
    logit_scale: Tensor,
    *,
    gather: bool = True,
    duplicate_keys: Tensor | None = None,
) -> Tensor:
    """Symmetric CLIP loss: mean of image->text and text->image cross entropy.

    ``image_embeds``/``text_embeds`` [B, D] (any scale; L2-normalised here, math in
    promote_types(dtype, float32)); ``logit_scale`` is the multiplier (already
    exponentiated). ``duplicate_keys`` [B] int64: columns sharing a row's key
    (other than its positive) are dropped from both denominators.
    """
    return _info_nce_core(
        image_embeds, text_embeds, logit_scale, gather=gather, duplicate_keys=duplicate_keys
    )


def siglip_loss(
    image_embeds: Tensor,
    text_embeds: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor,
    *,
    gather: bool = True,
    duplicate_keys: Tensor | None = None,
) -> Tensor:
    """Sigmoid loss (Zhai et al. 2023): sum over image-text pairs of
    -log sigmoid(z * (scale * cos + bias)), z = +1 for matching pairs and -1
    otherwise, divided by the global batch size. Pairs i != j with equal
    ``duplicate_keys`` are excluded from the sum.
    """
    b = _prepare(image_embeds, text_embeds, gather, duplicate_keys)
    n = b.n_global
    if n < 2:
        return _connected_zero(b.ct, image_embeds, text_embeds, logit_scale, logit_bias)
    scale = _as_scalar(logit_scale, b.ct, b.img.device)
    bias = _as_scalar(logit_bias, b.ct, b.img.device)
    # Each pair (i, j) is scored once: local images against all texts.
    txt_all = _gather_cols(b.txt, b, with_grad=b.txt.requires_grad)
    labels = _labels(b.img.shape[0], b.offset, b.img.device)
    _, mask = _dup_mask(duplicate_keys, b, labels)

    logits = scale * (b.img @ txt_all.T) + bias  # [B, N]
    sign = torch.full_like(logits, -1.0)
    sign[torch.arange(logits.shape[0], device=logits.device), labels] = 1.0
    terms = F.softplus(-sign * logits)  # = -log sigmoid(z * logit)
    if mask is not None:
        terms = terms.masked_fill(mask, 0.0)
    return terms.sum() * (b.world / float(n))
