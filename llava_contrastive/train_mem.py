"""`train_mem`-style entry (as upstream's llava/train/train_mem.py): flash-attention 2."""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a file (`deepspeed llava_contrastive/train.py ...`): the package
    _here = os.path.dirname(os.path.abspath(__file__))  # dir must not shadow the stdlib (queue.py)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, os.path.dirname(_here))


import importlib.util

from llava_contrastive.train import main  # noqa: E402

if __name__ == "__main__":
    if importlib.util.find_spec("flash_attn") is None:
        sys.exit("train_mem needs flash-attn (pip install flash-attn --no-build-isolation, on a CUDA machine); "
                 "use `python -m llava_contrastive.train` without it")
    main(attn_implementation="flash_attention_2")
