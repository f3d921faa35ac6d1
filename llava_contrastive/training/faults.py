"""Failure injection for the reliability tests (never set in real runs).

LLAVA_CONTRASTIVE_FAULTS="nonfinite_loss@4,kill_in_save@12" makes the run produce a NaN loss at
optimizer step 4 and SIGKILL itself in the middle of writing the checkpoint of step 12;
``enospc_in_save@8``: the first ``torch.save`` of the checkpoint of step 8 writes half its file, then
raises ``OSError(ENOSPC)`` as a full disk does (``failing_torch_save``).
"""
from __future__ import annotations

import contextlib
import errno
import os
from typing import Iterator, Optional

ENV = "LLAVA_CONTRASTIVE_FAULTS"


def fault_step(name: str) -> Optional[int]:
    for item in os.environ.get(ENV, "").split(","):
        key, _, step = item.strip().partition("@")
        if key == name and step.isdigit():
            return int(step)
    return None


@contextlib.contextmanager
def failing_torch_save(code: int = errno.ENOSPC) -> Iterator[None]:
    """Within the block, the first ``torch.save`` to a path writes the file, truncates it to half its
    size and raises ``OSError(code)`` (a disk that filled up mid-write); later calls are untouched."""
    import torch

    original = torch.save
    armed = [True]

    def save(obj, f, *args, **kwargs):
        if not armed[0] or not isinstance(f, (str, os.PathLike)):
            return original(obj, f, *args, **kwargs)
        armed[0] = False
        original(obj, f, *args, **kwargs)
        os.truncate(f, os.path.getsize(f) // 2)
        raise OSError(code, os.strerror(code), os.fspath(f))

    torch.save = save
    try:
        yield
    finally:
        torch.save = original
