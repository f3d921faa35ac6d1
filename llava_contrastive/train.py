"""`python -m llava_contrastive.train` / `deepspeed llava_contrastive/train.py`: upstream-host training.

Kept at this path for the documented commands; the code is in ``llava_contrastive.hosts.llava.train``.
"""
import os
import sys

if __package__ in (None, ""):  # run as a file (`deepspeed llava_contrastive/train.py`): the package dir must
    _here = os.path.dirname(os.path.abspath(__file__))  # not stand first on sys.path; its parent must
    sys.path[:] = [os.path.dirname(_here)] + [p for p in sys.path if os.path.abspath(p or ".") != _here]

from llava_contrastive.hosts.llava.train import activate, main  # noqa: E402,F401  (activate: patches/0002)

if __name__ == "__main__":
    sys.exit(main())
