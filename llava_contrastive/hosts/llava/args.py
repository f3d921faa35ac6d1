"""Flags the plugin adds to upstream's trainer beside the --contrastive_* ones."""
from dataclasses import dataclass, field

import torch

VISION_TOWER_DTYPES = ("auto", "float16", "bfloat16", "float32")


@dataclass
class HostArguments:
    vision_tower_dtype: str = field(default="auto", metadata={"help": (
        "dtype of the frozen vision tower: auto = upstream's choice (bf16 with --bf16, else fp16) on GPU, "
        "float32 on CPU where fp16 matmuls are emulated and about 10-70x slower | float16 | bfloat16 | float32")})
    nonfinite_max_skips: int = field(default=0, metadata={"help": (
        "non-finite loss or logit scale: the run stops naming the step and values, unless fewer than this many "
        "have occurred, in which case that micro-batch contributes a zero gradient (counted, logged)")})


def vision_tower_dtype(choice: str, bf16: bool, cuda: bool) -> torch.dtype:
    """The dtype the frozen vision tower runs in."""
    if choice not in VISION_TOWER_DTYPES:
        raise ValueError(f"--vision_tower_dtype {choice!r} is not one of {', '.join(VISION_TOWER_DTYPES)}")
    if choice != "auto":
        return getattr(torch, choice)
    upstream = torch.bfloat16 if bf16 else torch.float16
    if upstream is torch.float16 and not cuda:  # CPU-only: fp16 is emulated there
        return torch.float32
    return upstream
