"""Failure injection for the reliability tests (never set in real runs).

LLAVA_CONTRASTIVE_FAULTS="nonfinite_loss@4,kill_in_save@12" makes the run produce a NaN loss at
optimizer step 4 and SIGKILL itself in the middle of writing the checkpoint of step 12.
"""
from __future__ import annotations

import os
from typing import Optional

ENV = "LLAVA_CONTRASTIVE_FAULTS"


def fault_step(name: str) -> Optional[int]:
    for item in os.environ.get(ENV, "").split(","):
        key, _, step = item.strip().partition("@")
        if key == name and step.isdigit():
            return int(step)
    return None
