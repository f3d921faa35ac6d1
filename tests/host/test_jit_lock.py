"""A DeepSpeed run after a killed JIT build: torch's lock file is left behind and, unhandled, every later
``--deepspeed`` run waits on it forever in silence (a CI run once timed out that way). The entry removes
it, says so, and trains."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.host import runs

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.timeout(600)]


def test_a_stale_build_lock_does_not_hang_a_deepspeed_run(tiny_assets, work, initial_projector):
    build_dir = Path(runs.env()["TORCH_EXTENSIONS_DIR"]) / "deepspeed_shm_comm"
    build_dir.mkdir(parents=True, exist_ok=True)
    lock = build_dir / "lock"
    lock.touch()
    an_hour_ago = time.time() - 3600
    os.utime(lock, (an_hour_ago, an_hour_ago))
    try:
        args = runs.stage1_args(tiny_assets, work / "stale_lock", steps=2, batch=4, extra=[
            "--pretrain_mm_mlp_adapter", str(initial_projector), "--deepspeed", str(runs.ZERO2)])
        proc = runs.run("llava_contrastive.train", args, force_launcher=True, timeout=420,
                        log=work / "stale_lock.log")
    finally:
        lock.unlink(missing_ok=True)  # never leave the plant behind for the tests after this one
    assert f"removed the stale lock {lock}" in proc.stderr
    assert [h["step"] for h in runs.train_logs(work / "stale_lock")] == [1, 2]
