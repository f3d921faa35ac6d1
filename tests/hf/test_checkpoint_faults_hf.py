"""Full disk and damaged checkpoints on the native host: real subprocess runs of
``python -m llava_contrastive.hosts.hf.train`` on the tiny assets (4-6 steps, constant LR).

1. ``LLAVA_CONTRASTIVE_FAULTS=enospc_in_save@4``: the first file of checkpoint-4 is half written,
   then ENOSPC: exit code 1, a message naming the path, the free and the needed space;
   ``tmp-checkpoint-4`` removed, checkpoint-2 intact (verifies against its manifest).
2. the same command: resumes from checkpoint-2, finishes; checkpoint-4 carries a manifest.
3. ``mm_projector.bin`` of checkpoint-4 truncated, then the run extended to 6 steps: checkpoint-4 is
   reported damaged, checkpoint-2 resumed, and steps 3-4 repeat run 2's losses exactly.
"""
from __future__ import annotations

import os

import pytest

from hf.test_resume import logs, run, train_args
from llava_contrastive.training.checkpointing import MANIFEST_FILE, verify_checkpoint

pytestmark = pytest.mark.slow
CONSTANT_LR = ["--lr_scheduler_type", "constant", "--warmup_steps", "0"]


def test_enospc_then_damaged_newest_checkpoint_fall_back_to_the_previous_one(tiny_assets, native_dir, tmp_path):
    out = tmp_path / "run"
    args = train_args(tiny_assets, native_dir, out, steps=4, save=2, batch=4, extra=CONSTANT_LR)

    full = run(args, check=False, log=tmp_path / "enospc.log", LLAVA_CONTRASTIVE_FAULTS="enospc_in_save@4")
    assert full.returncode == 1, full.stderr[-3000:]
    assert f"CheckpointSaveError: saving {out / 'checkpoint-4'} failed, the disk is full: No space left on " \
           "device" in full.stderr
    assert "a checkpoint needs about" in full.stderr and "(the size of checkpoint-2)" in full.stderr
    assert f"the previous checkpoint {out / 'checkpoint-2'} is intact" in full.stderr
    assert "Traceback" not in full.stderr
    assert sorted(p.name for p in out.glob("*checkpoint-*")) == ["checkpoint-2"]
    assert verify_checkpoint(str(out / "checkpoint-2")) is None

    resumed = run(args, log=tmp_path / "resumed.log")
    assert f"resuming from {out / 'checkpoint-2'}" in resumed.stderr
    assert os.path.isfile(out / "checkpoint-4" / MANIFEST_FILE) and verify_checkpoint(str(out / "checkpoint-4")) is None
    first = {h["step"]: h for h in logs(out)}
    assert sorted(first) == [1, 2, 3, 4]

    victim = out / "checkpoint-4" / "mm_projector.bin"
    os.truncate(victim, victim.stat().st_size // 2)
    longer = train_args(tiny_assets, native_dir, out, steps=6, save=2, batch=4, extra=CONSTANT_LR)
    again = run(longer, log=tmp_path / "fallback.log")
    assert f"checkpoint {out / 'checkpoint-4'} is damaged (truncated: mm_projector.bin is" in again.stderr
    assert f"resuming from {out / 'checkpoint-2'}" in again.stderr
    second = {h["step"]: h for h in logs(out)}
    assert sorted(second) == [1, 2, 3, 4, 5, 6]
    for step in (3, 4):  # retrained from checkpoint-2: the same steps as run 2
        for key in ("loss", "ntp_loss", "contrastive_loss"):
            assert second[step][key] == pytest.approx(first[step][key], abs=1e-6), (step, key)
    assert all(verify_checkpoint(str(out / f"checkpoint-{n}")) is None for n in (2, 4, 6))
