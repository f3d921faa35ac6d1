"""Prompt templates for text embeddings from a text-only pass of the frozen LLM."""
from __future__ import annotations

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
