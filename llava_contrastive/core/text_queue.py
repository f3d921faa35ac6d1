"""FIFO queue of past text embeddings used as extra image->text negatives.

Only valid while the text side is frozen (no learnable text head, input
embeddings not trained): otherwise the queued embeddings are stale and the loss
is biased. Check with ``validate_queue_usage``.

Usage per micro-batch: compute ``info_nce_loss_with_queue`` first, then
``enqueue`` the gathered (global) text embeddings and keys, so the current
positives are never in the queue. The queue state is identical on all ranks
because the enqueued input is the gathered global batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llava_contrastive.core.distributed import gather_rows
from llava_contrastive.core.losses import _info_nce_core

__all__ = ["NO_KEY", "TextQueue", "info_nce_loss_with_queue", "validate_queue_usage"]

# Key stored for entries enqueued without keys: never equal to a caption_keys value.
NO_KEY = torch.iinfo(torch.int64).min


class TextQueue(nn.Module):
    """Buffers (saved in state_dict): ``embeds`` [K, D] (L2-normalised, detached),
    ``keys`` [K] int64, ``ptr`` (next write slot) and ``filled`` (valid entries)."""

    embeds: Tensor
    keys: Tensor
    ptr: Tensor
    filled: Tensor

    def __init__(self, size: int, dim: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if size <= 0 or dim <= 0:
            raise ValueError("queue size and dim must be > 0")
        self.size = int(size)
        self.register_buffer("embeds", torch.zeros(size, dim, dtype=dtype))
        self.register_buffer("keys", torch.full((size,), NO_KEY, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    def __len__(self) -> int:
        return int(self.filled.item())

    @torch.no_grad()
    def enqueue(self, text_embeds_global: Tensor, keys_global: Tensor | None = None) -> None:
        """Append a (gathered) batch [n, D]; the oldest entries are overwritten."""
        x = F.normalize(text_embeds_global.detach().to(self.embeds.dtype), dim=-1)
        n = x.shape[0]
        if keys_global is None:
            k = torch.full((n,), NO_KEY, dtype=torch.long, device=x.device)
        else:
            k = keys_global.detach().to(torch.long)
            if tuple(k.shape) != (n,):
                raise ValueError(f"keys must have shape [{n}], got {tuple(k.shape)}")
        if n > self.size:  # only the newest K survive
            x, k = x[-self.size :], k[-self.size :]
            n = self.size
        if n == 0:
            return
        p = int(self.ptr.item())
        idx = (torch.arange(n, device=self.embeds.device) + p) % self.size
        self.embeds[idx] = x.to(self.embeds.device)
        self.keys[idx] = k.to(self.keys.device)
        self.ptr.fill_((p + n) % self.size)
        self.filled.fill_(min(int(self.filled.item()) + n, self.size))

    @torch.no_grad()
    def enqueue_from_local(self, text_embeds: Tensor, keys: Tensor | None = None) -> None:
        """Gather this rank's batch from all ranks (no autograd), then enqueue.
        A collective: every rank must call it."""
        x, _ = gather_rows(text_embeds.detach(), with_grad=False)
        k = None if keys is None else gather_rows(keys.detach().to(torch.long), with_grad=False)[0]
        self.enqueue(x, k)

    def negatives(self) -> tuple[Tensor, Tensor]:
        """Valid entries (embeds [F, D], keys [F]); order is irrelevant to the loss."""
        f = int(self.filled.item())
        return self.embeds[:f], self.keys[:f]

    @torch.no_grad()
    def reset(self) -> None:
        self.embeds.zero_()
        self.keys.fill_(NO_KEY)
        self.ptr.zero_()
        self.filled.zero_()

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.embeds.shape[1]}"


def info_nce_loss_with_queue(
    image_embeds: Tensor,
    text_embeds: Tensor,
    logit_scale: Tensor,
    queue: TextQueue,
    *,
    gather: bool = True,
    duplicate_keys: Tensor | None = None,
) -> Tensor:
    """``info_nce_loss`` whose image->text denominators also include the queued
    text embeddings (masked where their key equals the row's key). The
    text->image direction is unchanged. With a non-empty queue a global batch of
    one row still yields a loss (the queue supplies negatives)."""
    q_embeds, q_keys = queue.negatives()
    return _info_nce_core(
        image_embeds,
        text_embeds,
        logit_scale,
        gather=gather,
        duplicate_keys=duplicate_keys,
        extra_text=q_embeds if q_embeds.shape[0] > 0 else None,
        extra_keys=q_keys,
    )


def validate_queue_usage(text_requires_grad: bool, has_text_head: bool) -> None:
    """Raise ValueError unless the text side is frozen (queue entries stay valid)."""
    problems = []
    if has_text_head:
        problems.append("a learnable text head is configured")
    if text_requires_grad:
        problems.append("the text embeddings require grad (text side is being trained)")
    if problems:
        raise ValueError(
            "TextQueue negatives are only valid while the text side is frozen "
            "(no learnable text head, input embeddings not trained), but "
            + " and ".join(problems)
            + ". Disable the queue or freeze the text side."
        )
