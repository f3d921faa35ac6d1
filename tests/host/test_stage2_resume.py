"""Stage 2 (upstream host) killed with SIGKILL in the middle of a checkpoint save resumes to the same
weights as an uninterrupted run: LoRA (adapter and the non-LoRA trainables, i.e. the projector, which
transformers' checkpoint alone would lose) and full fine-tune."""
from __future__ import annotations

import signal

import pytest
import torch
from safetensors.torch import load_file

from tests.host import runs

STEPS = 6


def _args(tiny_assets, out, projector, lora):
    args = runs.stage2_args(tiny_assets, out, projector, lora=lora, steps=STEPS)
    args[args.index("--save_strategy") + 1] = "steps"
    return args + ["--save_steps", "2"]


def _weights(out, lora):
    if lora:
        return {**load_file(str(out / "adapter_model.safetensors")),
                **torch.load(out / "non_lora_trainables.bin", weights_only=True)}
    return load_file(str(out / "model.safetensors"))


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_sigkill_in_save_then_rerun_matches_uninterrupted(tiny_assets, stage1_dir, tmp_path, lora):
    projector = stage1_dir / "mm_projector.bin"
    reference = tmp_path / "reference"
    runs.run("llava_contrastive.train", _args(tiny_assets, reference, projector, lora), log=tmp_path / "ref.log")

    out = tmp_path / "interrupted"
    args = _args(tiny_assets, out, projector, lora)
    killed = runs.run("llava_contrastive.train", args, check=False, log=tmp_path / "killed.log",
                      extra_env={"LLAVA_CONTRASTIVE_FAULTS": f"kill_in_save@{STEPS}"})
    assert killed.returncode == -signal.SIGKILL
    assert (out / "checkpoint-4").is_dir() and not (out / f"checkpoint-{STEPS}").exists()
    if lora:  # the projector trains in a LoRA stage 2 too: the checkpoint carries it
        assert (out / "checkpoint-4" / "non_lora_trainables.bin").is_file()

    resumed = runs.run("llava_contrastive.train", args, log=tmp_path / "resumed.log")
    assert resumed.stdout.count("{'loss'") == STEPS - 4  # it trained steps 5-6 only: resumed from checkpoint-4
    ref_logs, logs = runs.train_logs(reference), runs.train_logs(out)
    assert [h["step"] for h in logs] == list(range(1, STEPS + 1))
    assert [h["loss"] for h in logs] == [h["loss"] for h in ref_logs]  # as logged (4 decimals), every step
    mine, theirs = _weights(out, lora), _weights(reference, lora)
    assert sorted(mine) == sorted(theirs) and any("mm_projector" in k for k in mine)
    for k in theirs:
        assert torch.equal(mine[k], theirs[k]), k  # bitwise: same data order, RNG and optimizer state
