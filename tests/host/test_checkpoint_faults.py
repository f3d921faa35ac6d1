"""Damaged checkpoints and failing saves through the upstream host's trainer (ContrastiveLLaVATrainer
on transformers 4.37's Trainer: its staged tmp-checkpoint-N, rename, rotation and resume), on a
4-parameter regression model so that each run takes a second:

* every checkpoint carries a manifest that verifies; save_total_limit rotation goes through it;
* a truncated newest checkpoint is reported and the previous one resumed (transformers alone would
  take the damaged one), and the resumed run ends with the uninterrupted run's weights;
* an ENOSPC in the middle of a save (LLAVA_CONTRASTIVE_FAULTS=enospc_in_save@N: half a file, then
  OSError) stops the run with CheckpointSaveError naming the path and the space needed, the
  incomplete save removed; the same run then resumes from the previous checkpoint.
"""
from __future__ import annotations

import logging
import os

import pytest
import torch
from transformers.trainer_utils import get_last_checkpoint

from llava_contrastive.training.checkpointing import MANIFEST_FILE, CheckpointSaveError, verify_checkpoint


class Regression(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 1)

    def forward(self, x, y):
        return {"loss": ((self.lin(x).squeeze(-1) - y) ** 2).mean()}


def dataset(n=48):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1 * torch.randn(n, generator=g)
    return [{"x": x[i], "y": y[i]} for i in range(n)]


def trainer_for(out, steps, **extra):
    from llava_contrastive.hosts.llava.compat import upstream_train_module
    from llava_contrastive.hosts.llava.trainer import ContrastiveLLaVATrainer

    torch.manual_seed(0)
    args = upstream_train_module().TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, learning_rate=0.05,
        lr_scheduler_type="constant", save_strategy="steps", save_steps=2, logging_steps=1, report_to=[],
        seed=0, use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, **extra)
    args.contrastive_weight = 0.0  # NTP-only (stage-2-like) path: a plain model is enough
    return ContrastiveLLaVATrainer(model=Regression(), args=args, train_dataset=dataset())


def weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def losses(trainer):
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted: 6 steps, a checkpoint every 2."""
    t = trainer_for(tmp_path_factory.mktemp("ref") / "out", 6)
    t.train()
    return weights(t), losses(t)


def test_checkpoints_carry_a_manifest_and_rotation_keeps_the_newest(tmp_path, reference):
    t = trainer_for(tmp_path / "out", 6, save_total_limit=2)
    t.train()
    names = sorted(os.listdir(tmp_path / "out"))
    assert names == ["checkpoint-4", "checkpoint-6"], names
    for name in names:
        assert os.path.isfile(tmp_path / "out" / name / MANIFEST_FILE)
        assert verify_checkpoint(str(tmp_path / "out" / name)) is None
    assert t._verified_checkpoint == str(tmp_path / "out" / "checkpoint-6")
    for k, v in reference[0].items():
        torch.testing.assert_close(weights(t)[k], v, rtol=0, atol=0)


def test_truncated_newest_checkpoint_is_reported_and_the_previous_one_resumed(tmp_path, reference, caplog):
    out = tmp_path / "out"
    trainer_for(out, 4).train()  # checkpoints 2 and 4 (constant LR: the same first 4 steps as the reference)
    victim = out / "checkpoint-4" / "optimizer.pt"
    os.truncate(victim, victim.stat().st_size // 2)  # a node died mid-copy
    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-4")  # what transformers alone would load
    t = trainer_for(out, 6)
    with caplog.at_level(logging.WARNING, logger="llava_contrastive"):
        t.train(resume_from_checkpoint=True)  # what upstream's train() passes when checkpoint-* exist
    assert any(f"checkpoint {out / 'checkpoint-4'} is damaged (truncated: optimizer.pt is" in r.getMessage()
               for r in caplog.records)
    ref_weights, ref_losses = reference
    assert sorted(losses(t)) == [1, 2, 3, 4, 5, 6]  # 1-2 from checkpoint-2's state, 3-6 retrained
    for step in (3, 4, 5, 6):
        assert losses(t)[step] == pytest.approx(ref_losses[step], abs=1e-7)
    for k, v in ref_weights.items():
        torch.testing.assert_close(weights(t)[k], v, rtol=0, atol=1e-7)
    assert verify_checkpoint(str(out / "checkpoint-4")) is None  # rewritten by the resumed run


def test_enospc_during_a_save_stops_with_the_path_and_the_space_then_resumes(tmp_path, reference, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setenv("LLAVA_CONTRASTIVE_FAULTS", "enospc_in_save@4")
    with pytest.raises(CheckpointSaveError) as err:
        trainer_for(out, 6).train()
    msg = str(err.value)
    assert f"saving {out / 'checkpoint-4'} failed, the disk is full: No space left on device" in msg
    assert "tmp-checkpoint-4" in msg  # the file that failed
    assert "a checkpoint needs about" in msg and "(the size of checkpoint-2)" in msg and "Free space on" in msg
    assert f"the previous checkpoint {out / 'checkpoint-2'} is intact" in msg
    assert sorted(os.listdir(out)) == ["checkpoint-2"]  # the incomplete tmp-checkpoint-4 was removed
    assert verify_checkpoint(str(out / "checkpoint-2")) is None
    assert err.value.needed == sum(f.stat().st_size for f in (out / "checkpoint-2").rglob("*") if f.is_file())

    monkeypatch.delenv("LLAVA_CONTRASTIVE_FAULTS")
    t = trainer_for(out, 6)
    t.train(resume_from_checkpoint=True)
    for k, v in reference[0].items():
        torch.testing.assert_close(weights(t)[k], v, rtol=0, atol=1e-7)


def test_enospc_while_overwriting_an_existing_checkpoint_in_place_removes_it(tmp_path, monkeypatch):
    """transformers 4.37 writes into an existing checkpoint-N in place: half overwritten, it is
    neither the old nor the new checkpoint, so it is removed too (the earlier ones stay)."""
    out = tmp_path / "out"
    trainer_for(out, 4).train()
    monkeypatch.setenv("LLAVA_CONTRASTIVE_FAULTS", "enospc_in_save@4")
    t = trainer_for(out, 6)
    with pytest.raises(CheckpointSaveError):
        t.train(resume_from_checkpoint=str(out / "checkpoint-2"))  # re-saves step 4 over checkpoint-4
    assert sorted(os.listdir(out)) == ["checkpoint-2"]
    assert verify_checkpoint(str(out / "checkpoint-2")) is None


def test_explicit_damaged_checkpoint_is_refused_with_the_reason(tmp_path):
    out = tmp_path / "out"
    trainer_for(out, 2).train()
    (out / "checkpoint-2" / "scheduler.pt").unlink()
    with pytest.raises(ValueError, match="not a usable checkpoint \\(missing file scheduler.pt\\)"):
        trainer_for(out, 4).train(resume_from_checkpoint=str(out / "checkpoint-2"))


@pytest.mark.slow
def test_stage1_cli_enospc_then_damaged_checkpoint_fall_back(tiny_assets, tmp_path):
    """The real stage-1 CLI (trainable-only checkpoints, upstream's auto-resume): ENOSPC while saving
    checkpoint-4 stops the run and leaves checkpoint-2; the same command resumes from it; a truncated
    checkpoint-4 is then skipped for checkpoint-2, and steps 3-4 repeat the resumed run's losses."""
    from tests.host import runs

    out = tmp_path / "run"
    extra = ["--save_steps", "2", "--lr_scheduler_type", "constant"]
    args = runs.stage1_args(tiny_assets, out, steps=4, batch=4, extra=extra)
    full = runs.run("llava_contrastive.train", args, check=False, log=tmp_path / "enospc.log",
                    extra_env={"LLAVA_CONTRASTIVE_FAULTS": "enospc_in_save@4"})
    assert full.returncode != 0
    assert f"CheckpointSaveError: saving {out / 'checkpoint-4'} failed, the disk is full" in full.stderr
    assert sorted(p.name for p in out.glob("*checkpoint-*")) == ["checkpoint-2"]
    assert verify_checkpoint(str(out / "checkpoint-2")) is None

    runs.run("llava_contrastive.train", args, log=tmp_path / "resumed.log")
    first = {h["step"]: h for h in runs.train_logs(out)}
    assert sorted(first) == [1, 2, 3, 4] and verify_checkpoint(str(out / "checkpoint-4")) is None

    victim = out / "checkpoint-4" / "optimizer.pt"
    os.truncate(victim, victim.stat().st_size // 2)
    longer = runs.stage1_args(tiny_assets, out, steps=6, batch=4, extra=extra)
    again = runs.run("llava_contrastive.train", longer, log=tmp_path / "fallback.log")
    assert f"checkpoint {out / 'checkpoint-4'} is damaged (truncated: optimizer.pt is" in again.stderr
    second = {h["step"]: h for h in runs.train_logs(out)}
    assert sorted(second) == [1, 2, 3, 4, 5, 6]
    for step in (3, 4):
        assert second[step]["loss"] == pytest.approx(first[step]["loss"], abs=1e-6), step
