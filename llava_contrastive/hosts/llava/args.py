"""Flags the plugin adds to upstream's trainer beside the --contrastive_* ones."""
from dataclasses import dataclass, field

import torch

VISION_TOWER_DTYPES = ("auto", "float16", "bfloat16", "float32")
PROJECTOR_INITS = ("upstream", "normal")


@dataclass
class HostArguments:
    vision_tower_dtype: str = field(default="auto", metadata={"help": (
        "dtype of the frozen vision tower: auto = upstream's choice (bf16 with --bf16, else fp16) on GPU, "
        "float32 on CPU where fp16 matmuls are emulated and about 10-70x slower | float16 | bfloat16 | float32")})
    nonfinite_max_skips: int = field(default=0, metadata={"help": (
        "non-finite loss or logit scale: the run stops naming the step and values, unless fewer than this many "
        "have occurred, in which case that micro-batch contributes a zero gradient (counted, logged)")})
    mm_projector_init: str = field(default="upstream", metadata={"help": (
        "stage-1 start of the projector: upstream = nn.Linear's defaults (kaiming-uniform weights, uniform "
        "biases) | normal = weights ~ N(0, --mm_projector_init_std), zero biases, drawn from --seed. Only for a "
        "new projector (refused with --pretrain_mm_mlp_adapter)")})
    mm_projector_init_std: float = field(default=0.02, metadata={"help": "std of --mm_projector_init normal"})


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


def check_projector_init(choice: str, std: float, pretrained_adapter) -> None:
    """Raise ValueError for a bad --mm_projector_init request."""
    if choice not in PROJECTOR_INITS:
        raise ValueError(f"--mm_projector_init {choice!r} is not one of {', '.join(PROJECTOR_INITS)}")
    if choice != "upstream" and pretrained_adapter:
        raise ValueError(f"--mm_projector_init {choice} would overwrite the projector loaded from "
                         f"--pretrain_mm_mlp_adapter {pretrained_adapter}; drop one of the two")
    if std <= 0:
        raise ValueError(f"--mm_projector_init_std must be > 0, got {std}")
