"""ContrastiveArguments: every `--contrastive_*` flag, one commented line each.

Pure dataclass (no transformers import) so hosts can merge it into their own argument classes.
"""

from dataclasses import asdict, dataclass, field, fields
from typing import Optional

LOSSES = ("infonce", "siglip")
TEXT_SOURCES = ("input_embeds", "llm")
IMAGE_SOURCES = ("projector", "llm")
POOLINGS = ("auto", "mean", "last")
HEADS = ("none", "linear")
# fields that do not change what a run computes: left out of to_dict (config.json, resume comparison)
RUNTIME_FIELDS = ("contrastive_text_cache",)


def _flag(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ContrastiveArguments:
    contrastive_weight: float = _flag(0.5, "lambda in loss = NTP + lambda * contrastive; 0 reproduces upstream NTP-only training")
    contrastive_loss: str = _flag("infonce", f"contrastive objective: {' | '.join(LOSSES)}")
    contrastive_temperature: Optional[float] = _flag(None, "initial temperature (logit scale = 1/T); default 0.07 for infonce, 0.1 for siglip")
    contrastive_learnable_temperature: bool = _flag(True, "learn the logit scale (stored as log scale, kept out of weight decay)")
    contrastive_max_logit_scale: float = _flag(100.0, "cap on the effective logit scale (clamped in forward and after each step)")
    contrastive_text_source: str = _flag("input_embeds", "text embedding: input_embeds (frozen LLM input embeddings of the caption, no extra compute) | llm (no-grad text-only pass of the frozen LLM over --contrastive_prompt)")
    contrastive_prompt: str = _flag("prompteol", "template for --contrastive_text_source llm: none | prompteol | e5v | any string containing {caption}")
    contrastive_text_layer: int = _flag(-1, "hidden-state layer of the text-only pass (-1: last, after the final norm)")
    contrastive_text_pooling: str = _flag("auto", "text pooling: mean | last | auto (mean for input_embeds, last token for llm)")
    contrastive_image_source: str = _flag("projector", "image embedding: projector (projected image tokens of the NTP pass) | llm (LLM hidden states at the image positions of the same pass)")
    contrastive_image_layer: int = _flag(-1, "hidden-state layer for --contrastive_image_source llm")
    contrastive_image_pooling: str = _flag("auto", "image pooling: mean | last | auto (mean)")
    contrastive_head: str = _flag("none", "learnable heads into a shared space: none | linear (one Linear per modality)")
    contrastive_head_dim: int = _flag(0, "output size of --contrastive_head linear (0: the LLM hidden size)")
    contrastive_gather: bool = _flag(True, "negatives from all ranks (exact gradients through the gather)")
    contrastive_mask_duplicates: bool = _flag(True, "identical captions in the global batch are not negatives of each other")
    contrastive_queue_size: int = _flag(0, "extra text negatives from a queue of past batches (infonce, frozen text side only); 0 = off")
    contrastive_lr: Optional[float] = _flag(None, "learning rate of the contrastive head (logit scale, bias, linear heads); default: --learning_rate")
    contrastive_text_cache: Optional[str] = _flag(None, "directory of cached text embeddings for --contrastive_text_source llm: each caption's prompted-LLM embedding is computed once, stored (keyed by model weights, prompt, layer, pooling, caption tokens), memory-mapped and reused; missing captions are computed and appended; a cache built for other settings is refused. Fill ahead with `llava-contrastive text-cache` (core/text_cache.py). Does not change results, so not saved with the run")

    def validate(self) -> None:
        """Raise ValueError naming the flag and its allowed values."""
        def check(name: str, allowed: tuple[str, ...]) -> None:
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"--{name} {value!r} is not one of {', '.join(allowed)}")

        check("contrastive_loss", LOSSES)
        check("contrastive_text_source", TEXT_SOURCES)
        check("contrastive_image_source", IMAGE_SOURCES)
        check("contrastive_text_pooling", POOLINGS)
        check("contrastive_image_pooling", POOLINGS)
        check("contrastive_head", HEADS)
        if self.contrastive_weight < 0:
            raise ValueError(f"--contrastive_weight must be >= 0, got {self.contrastive_weight}")
        if self.contrastive_temperature is not None and self.contrastive_temperature <= 0:
            raise ValueError(f"--contrastive_temperature must be > 0, got {self.contrastive_temperature}")
        if self.contrastive_max_logit_scale <= 0:
            raise ValueError("--contrastive_max_logit_scale must be > 0")
        if self.contrastive_queue_size < 0:
            raise ValueError("--contrastive_queue_size must be >= 0")
        if self.contrastive_queue_size and self.contrastive_loss != "infonce":
            raise ValueError("--contrastive_queue_size works with --contrastive_loss infonce only")
        if self.contrastive_queue_size and self.contrastive_head != "none":
            raise ValueError("--contrastive_queue_size needs a frozen text side: it cannot be combined with "
                             "--contrastive_head linear (queued text embeddings would go stale)")
        if self.contrastive_text_source == "llm":
            from llava_contrastive.core.prompts import resolve_template
            resolve_template(self.contrastive_prompt)

    @property
    def enabled(self) -> bool:
        return self.contrastive_weight > 0

    @property
    def text_pooling(self) -> str:
        if self.contrastive_text_pooling != "auto":
            return self.contrastive_text_pooling
        return "last" if self.contrastive_text_source == "llm" else "mean"

    @property
    def image_pooling(self) -> str:
        return "mean" if self.contrastive_image_pooling == "auto" else self.contrastive_image_pooling

    @property
    def temperature(self) -> float:
        if self.contrastive_temperature is not None:
            return self.contrastive_temperature
        return 0.1 if self.contrastive_loss == "siglip" else 0.07

    def to_dict(self) -> dict:
        """The settings that define the run (saved in config.json, compared on resume); runtime-only
        fields (e.g. the text cache's location) are left out."""
        return {f.name: getattr(self, f.name) for f in fields(ContrastiveArguments) if f.name not in RUNTIME_FIELDS}

    @classmethod
    def from_object(cls, obj) -> "ContrastiveArguments":
        """Pick the contrastive fields out of any object carrying them (e.g. merged TrainingArguments)."""
        if isinstance(obj, dict):
            return cls(**{f.name: obj[f.name] for f in fields(cls) if f.name in obj})
        return cls(**{f.name: getattr(obj, f.name) for f in fields(cls) if hasattr(obj, f.name)})


__all__ = ["ContrastiveArguments", "LOSSES", "TEXT_SOURCES", "IMAGE_SOURCES", "POOLINGS", "HEADS", "asdict"]
