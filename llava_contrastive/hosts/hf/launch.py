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


def joined_report_to(argv: Sequence[str]) -> List[str]:
    """``--report_to tensorboard wandb`` (several values, as upstream's transformers 4 CLI takes them)
    as ``--report_to tensorboard,wandb``: transformers 5's parser takes one value for this flag.
    ``split_report_to`` undoes the join after parsing."""
    out: List[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        out.append(args[i])
        if args[i] == "--report_to":
            values = []
            while i + 1 < len(args) and not args[i + 1].startswith("--"):
                values.append(args[i + 1])
                i += 1
            out.append(",".join(values))
        i += 1
    return out


def logging_dir_to_env(argv: Sequence[str]) -> List[str]:
    """``--logging_dir DIR`` (transformers 4's flag, which transformers 5 dropped) as the
    TENSORBOARD_LOGGING_DIR its TensorBoard callback reads; argv without the flag."""
    out, args, i = [], list(argv), 0
    while i < len(args):
        a = args[i]
        if a == "--logging_dir" and i + 1 < len(args):
            os.environ["TENSORBOARD_LOGGING_DIR"] = args[i + 1]
            i += 2
            continue
        if a.startswith("--logging_dir="):
            os.environ["TENSORBOARD_LOGGING_DIR"] = a.split("=", 1)[1]
        else:
            out.append(a)
        i += 1
    return out


def split_report_to(training_args) -> None:
    """["tensorboard,wandb"] -> ["tensorboard", "wandb"] (before the Trainer builds its callbacks)."""
    report_to = training_args.report_to
    if isinstance(report_to, list) and any("," in r for r in report_to):
        training_args.report_to = [v for r in report_to for v in r.split(",") if v and v != "none"]


def init_distributed_for_deepspeed(training_args) -> None:
    """Under a launcher with ``--deepspeed``: set up the process group through DeepSpeed before
    ``from_pretrained`` (ZeRO-3 partitions at load time), so its config sees the real world size;
    otherwise "auto" batch sizes are checked against a world size of 1."""
    if not training_args.deepspeed or "RANK" not in os.environ:
        return
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo" if training_args.use_cpu else "nccl")
