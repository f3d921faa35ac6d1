"""`train_mem`-style entry (as upstream's llava/train/train_mem.py): flash-attention 2."""
from __future__ import annotations

import importlib.util
import sys
from typing import Optional, Sequence

from llava_contrastive.hosts.llava import train


def main(argv: Optional[Sequence[str]] = None) -> int:
    if importlib.util.find_spec("flash_attn") is None:
        sys.stderr.write("train_mem needs flash-attn (pip install flash-attn --no-build-isolation, on a CUDA "
                         "machine); use `llava-contrastive train` without it\n")
        return 2
    return train.main(None if argv is None else list(argv), attn_implementation="flash_attention_2")


if __name__ == "__main__":
    sys.exit(main())
