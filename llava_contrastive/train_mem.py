"""`deepspeed llava_contrastive/train_mem.py`: upstream-host training with flash-attention 2.

Kept at this path for the documented commands; the code is in ``llava_contrastive.hosts.llava.train_mem``.
"""
import os
import sys

if __package__ in (None, ""):  # run as a file (`deepspeed llava_contrastive/train_mem.py`): the package dir must
    _here = os.path.dirname(os.path.abspath(__file__))  # not stand first on sys.path; its parent must
    sys.path[:] = [os.path.dirname(_here)] + [p for p in sys.path if os.path.abspath(p or ".") != _here]

from llava_contrastive.hosts.llava.train_mem import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
