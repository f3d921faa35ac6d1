"""The learnable part of the contrastive term: logit scale, SigLIP bias, optional linear heads,
optional text queue. Saved beside (never inside) mm_projector.bin; every parameter here is
excluded from weight decay."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn

from llava_contrastive.core.config import ContrastiveArguments
from llava_contrastive.core.losses import info_nce_loss, siglip_loss
from llava_contrastive.core.metrics import in_batch_accuracy
from llava_contrastive.core.text_queue import TextQueue, info_nce_loss_with_queue
from llava_contrastive.core.temperature import LogitScale, SigLIPBias


@dataclass
class JointTerms:
    loss: torch.Tensor  # what backward runs on
    ntp: torch.Tensor
    contrastive: torch.Tensor
    logit_scale: torch.Tensor
    rows: torch.Tensor  # image-caption pairs in this micro-batch
    i2t: Optional[torch.Tensor]  # in-batch retrieval accuracy (None below 2 pairs)
    t2i: Optional[torch.Tensor]


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

    def joint(self, ntp: torch.Tensor, image: torch.Tensor, text: torch.Tensor, keys: Optional[torch.Tensor], *,
              weight: float, gather: bool = True, update_queue: bool = False) -> "JointTerms":
        """NTP + weight * contrastive, with the detached statistics a trainer logs."""
        contrastive = self.loss(image, text, keys, gather=gather, update_queue=update_queue)
        with torch.no_grad():
            acc = in_batch_accuracy(image.float(), text.float()) if image.shape[0] > 1 else None

        def scalar(value: float) -> torch.Tensor:
            return torch.tensor(float(value), device=ntp.device)

        return JointTerms(
            loss=ntp + weight * contrastive.to(ntp.dtype), ntp=ntp.detach(), contrastive=contrastive.detach(),
            logit_scale=self.logit_scale().detach(), rows=scalar(image.shape[0]),
            i2t=None if acc is None else scalar(acc["i2t"]), t2i=None if acc is None else scalar(acc["t2i"]))

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


def optimizer_with_head_group(create: Callable[[], torch.optim.Optimizer], head_params: list,
                              lr: float, weight_decay: float = 0.0, decayed: Sequence = ()) -> torch.optim.Optimizer:
    """``create()`` (a trainer's own grouping) with ``head_params`` hidden from it, then groups for
    them with their own learning rate: those in ``decayed`` with ``weight_decay``, the rest (by
    default all: the contrastive head) without. Also used for stage 2's projector group
    (``--mm_projector_lr``). Empty groups are dropped (e.g. upstream's --mm_projector_lr with LoRA),
    which torch >= 2.x schedulers reject."""
    for p in head_params:
        p.requires_grad_(False)
    try:
        optimizer = create()
    finally:
        for p in head_params:
            p.requires_grad_(True)
    decayed_ids = {id(p) for p in decayed}
    for with_decay in (True, False):
        params = [p for p in head_params if (id(p) in decayed_ids) == with_decay]
        if params:
            optimizer.add_param_group({"params": params, "weight_decay": weight_decay if with_decay else 0.0,
                                       "lr": lr})
    optimizer.param_groups[:] = [g for g in optimizer.param_groups if len(g["params"]) > 0]
    return optimizer


def clamp_logit_scale(model: nn.Module) -> None:
    """In-place clamp of the learnable log scale after an optimizer step (the forward clamps too,
    which is what holds under ZeRO-3 partitioning, skipped here, or bf16 master weights)."""
    target = find_contrastive_model(model)
    head = getattr(target, "contrastive_head", None)
    if head is not None and not any(hasattr(p, "ds_id") for p in head.parameters()):
        head.clamp_()
