"""The learnable part of the contrastive term: logit scale, SigLIP bias, optional linear heads,
optional text queue. Saved beside (never inside) mm_projector.bin; every parameter here is
excluded from weight decay."""
from __future__ import annotations

import torch
import torch.nn as nn

from .config import ContrastiveArguments
from .losses import info_nce_loss, siglip_loss
from .queue import TextQueue, info_nce_loss_with_queue
from .temperature import LogitScale, SigLIPBias


class ContrastiveHead(nn.Module):
    def __init__(self, args: ContrastiveArguments, hidden_size: int):
        super().__init__()
        learnable = args.contrastive_learnable_temperature
        self.scale = LogitScale(init_temperature=args.temperature, max_scale=args.contrastive_max_logit_scale,
                                learnable=learnable)
        self.bias = SigLIPBias(learnable=learnable) if args.contrastive_loss == "siglip" else None
        dim = args.contrastive_head_dim or hidden_size
        self.image_proj = nn.Linear(hidden_size, dim) if args.contrastive_head == "linear" else None
        self.text_proj = nn.Linear(hidden_size, dim) if args.contrastive_head == "linear" else None
        self.queue = TextQueue(args.contrastive_queue_size, dim) if args.contrastive_queue_size else None

    def logit_scale(self) -> torch.Tensor:
        return self.scale()

    def logit_bias(self) -> torch.Tensor:
        if self.bias is None:
            raise RuntimeError("logit bias exists for --contrastive_loss siglip only")
        return self.bias()

    def project(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.image_proj is not None:
            image = self.image_proj(image.to(self.image_proj.weight.dtype))
            text = self.text_proj(text.to(self.text_proj.weight.dtype))
        return image, text

    def loss(self, image: torch.Tensor, text: torch.Tensor, keys: torch.Tensor | None = None, *,
             gather: bool = True, update_queue: bool = False) -> torch.Tensor:
        """The configured contrastive loss on projected embeddings (SigLIP if a bias exists, InfoNCE
        with the queue's extra negatives if a queue exists). ``update_queue`` enqueues the batch's
        texts after the loss, so a batch is never its own negative."""
        scale = self.logit_scale()
        if self.bias is not None:
            return siglip_loss(image, text, scale, self.logit_bias(), gather=gather, duplicate_keys=keys)
        if self.queue is None:
            return info_nce_loss(image, text, scale, gather=gather, duplicate_keys=keys)
        loss = info_nce_loss_with_queue(image, text, scale, self.queue, gather=gather, duplicate_keys=keys)
        if update_queue:
            self.queue.enqueue_from_local(text, keys)
        return loss

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    @torch.no_grad()
    def clamp_(self) -> None:
        self.scale.clamp_()


def find_contrastive_model(model: nn.Module) -> nn.Module | None:
    """The module carrying ``contrastive_head`` inside DeepSpeed/DDP/PEFT wrappers, or None."""
    seen = model
    for _ in range(5):
        if hasattr(seen, "contrastive_head"):
            return seen
        for attr in ("module", "base_model", "model"):
            inner = getattr(seen, attr, None)
            if isinstance(inner, nn.Module):
                seen = inner
                break
        else:
            return None
    return None
