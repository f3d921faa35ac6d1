"""Core checkpoint helpers (llava_contrastive/checkpointing.py), shared by both hosts."""
from __future__ import annotations

import os
import types

import pytest
import torch

from llava_contrastive.training import checkpointing as ck
from llava_contrastive.core.config import ContrastiveArguments
from llava_contrastive.core.head import ContrastiveHead


def holder(**flags):
    args = ContrastiveArguments(**flags)
    return types.SimpleNamespace(contrastive_args=args, contrastive_head=ContrastiveHead(args, 8))


def test_head_round_trip_and_refusal(tmp_path):
    src = holder(contrastive_head="linear", contrastive_head_dim=4)
    with torch.no_grad():
        for p in src.contrastive_head.parameters():
            p.normal_()
    ck.save_head(src.contrastive_head.state_dict(), src.contrastive_args.to_dict(), str(tmp_path))
    dst = holder(contrastive_head="linear", contrastive_head_dim=4)
    ck.load_head(dst, str(tmp_path))
    for (k, a), (_, b) in zip(src.contrastive_head.state_dict().items(), dst.contrastive_head.state_dict().items()):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError, match="contrastive_head_dim"):
        ck.load_head(holder(contrastive_head="linear", contrastive_head_dim=6), str(tmp_path))


def test_queue_run_head_loads_for_evaluation_only(tmp_path):
    """A run trained with a text queue: training resumes need the same queue; evaluation (no queue)
    loads the head and ignores the queue buffers."""
    src = holder(contrastive_queue_size=32)
    with torch.no_grad():
        src.contrastive_head.scale.log_scale.fill_(1.5)
    assert any(k.startswith("queue.") for k in src.contrastive_head.state_dict())
    ck.save_head(src.contrastive_head.state_dict(), src.contrastive_args.to_dict(), str(tmp_path))
    evaluated = holder(contrastive_queue_size=0)
    with pytest.raises(ValueError, match="contrastive_queue_size"):
        ck.load_head(evaluated, str(tmp_path))
    ck.load_head(evaluated, str(tmp_path), for_evaluation=True)
    assert evaluated.contrastive_head.scale.log_scale.item() == 1.5


def test_staged_checkpoints(tmp_path):
    out = tmp_path / "run"
    for step, complete in ((2, True), (4, True), (6, False)):
        d = out / f"checkpoint-{step}"
        d.mkdir(parents=True)
        if complete:
            (d / ck.TRAINER_STATE_FILE).write_text("{}")
    (out / "tmp-checkpoint-8").mkdir()
    assert ck.last_complete_checkpoint(str(out)).endswith("checkpoint-4")
    removed = sorted(os.path.basename(p) for p in ck.clean_incomplete_checkpoints(str(out)))
    assert removed == ["checkpoint-6", "tmp-checkpoint-8"]
    staging = ck.staging_dir(str(out / "checkpoint-8"))
    os.makedirs(staging)
    (tmp_path / "run" / "tmp-checkpoint-8" / ck.TRAINER_STATE_FILE).write_text("{}")
    ck.commit_staged(staging, str(out / "checkpoint-8"))
    assert ck.last_complete_checkpoint(str(out)).endswith("checkpoint-8") and not os.path.exists(staging)
