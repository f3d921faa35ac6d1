"""Prompt templates for text embeddings from a text-only pass of the frozen LLM."""
from __future__ import annotations

from typing import List, Optional

import torch

PROMPTS: dict[str, str] = {
    # the caption alone
    "none": "{caption}",
    # PromptEOL (Jiang et al. 2023): summarise the sentence into the next word
    "prompteol": 'This sentence : "{caption}" means in one word:"',
    # E5-V (Jiang et al. 2024) text prompt
    "e5v": "{caption}\nSummary above sentence in one word:",
}


def resolve_template(name_or_template: str) -> str:
    """A named template, or a user template containing exactly one ``{caption}``."""
    if name_or_template in PROMPTS:
        return PROMPTS[name_or_template]
    if name_or_template.count("{caption}") != 1:
        raise ValueError(
            f"--contrastive_prompt {name_or_template!r}: use one of {', '.join(PROMPTS)} "
            "or a template containing {caption} exactly once")
    return name_or_template


def split_template(template: str) -> tuple[str, str]:
    """(prefix, suffix) around the caption."""
    prefix, suffix = resolve_template(template).split("{caption}")
    return prefix, suffix


def whitespace_token_ids(tokenizer) -> torch.Tensor:
    """Ids whose text is only whitespace (the plain template's trailing separator)."""
    ids = []
    for token in ("\n", " ", "\n\n"):
        ids.extend(tokenizer(token, add_special_tokens=False).input_ids)
    ids = [i for i in set(ids) if tokenizer.decode([i]).strip() == ""]
    return torch.tensor(sorted(ids), dtype=torch.long)


def build_prompt_batch(ids: torch.Tensor, caption_mask: torch.Tensor, prefix: List[int],
                       suffix: List[int], bos: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded [bos] + prefix + caption + suffix per row, and its attention mask (built on the
    device with one scatter per part, no per-row host round trips)."""
    device = ids.device
    head = torch.tensor(([bos] if bos is not None else []) + list(prefix), dtype=torch.long, device=device)
    tail = torch.tensor(list(suffix), dtype=torch.long, device=device)
    mask = caption_mask.bool()
    lengths = mask.sum(1)
    total = head.numel() + lengths + tail.numel()
    out = torch.zeros(ids.shape[0], int(total.max()), dtype=torch.long, device=device)
    out[:, : head.numel()] = head
    rows, cols = torch.nonzero(mask, as_tuple=True)
    out[rows, head.numel() + mask.long().cumsum(1)[rows, cols] - 1] = ids[rows, cols]
    if tail.numel():
        tail_cols = head.numel() + lengths.unsqueeze(1) + torch.arange(tail.numel(), device=device)
        out.scatter_(1, tail_cols, tail.expand(ids.shape[0], -1))
    attention = (torch.arange(out.shape[1], device=device).unsqueeze(0) < total.unsqueeze(1)).long()
    return out, attention
