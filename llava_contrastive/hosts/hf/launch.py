"""Process set-up shared by the native host's entry points (stage 1 ``train``, stage 2 ``finetune``)."""
from __future__ import annotations

import os
from typing import List, Optional, Sequence

import torch


def with_cpu_flag(argv: Optional[Sequence[str]]) -> List[str]:
    """Adds ``--use_cpu true`` on machines without CUDA unless given. It must be in the arguments the
    TrainingArguments are built from: set afterwards, multi-rank CPU runs stay world size 1 and every
    rank trains on the whole dataset."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if not torch.cuda.is_available() and not any(a == "--use_cpu" or a.startswith("--use_cpu=") for a in args):
        args += ["--use_cpu", "true"]
    return args


def init_distributed_for_deepspeed(training_args) -> None:
    """Under a launcher with ``--deepspeed``: set up the process group through DeepSpeed before
    ``from_pretrained`` (ZeRO-3 partitions at load time), so its config sees the real world size;
    otherwise "auto" batch sizes are checked against a world size of 1."""
    if not training_args.deepspeed or "RANK" not in os.environ:
        return
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo" if training_args.use_cpu else "nccl")
