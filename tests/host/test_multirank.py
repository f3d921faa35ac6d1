"""2 ranks under DeepSpeed ZeRO-2 / ZeRO-3 (torchrun, gloo, CPU) against one process, then
upstream stage 2 (LoRA, ZeRO-3) from the projector they wrote."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.host import runs

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.timeout(600)]
STEPS = 6


@pytest.fixture(scope="session")
def eight_records(tiny_assets, work) -> Path:
    """8 records: with a global batch of 8 every step sees the same set of pairs whatever the
    sampler does, so 1 process and 2 ranks see the same global batch."""
    records = json.loads(Path(tiny_assets.pretrain_json).read_text())[:8]
    path = work / "eight.json"
    path.write_text(json.dumps(records))
    return path


def _stage1(tiny_assets, work, eight_records, initial_projector, name, nproc, config):
    out = work / name
    args = runs.stage1_args(tiny_assets, out, steps=STEPS, batch=8 // nproc, extra=[
        "--data_path", str(eight_records), "--pretrain_mm_mlp_adapter", str(initial_projector),
        "--deepspeed", str(config)])
    runs.run("llava_contrastive.train", args, nproc=nproc, force_launcher=True, log=work / f"{name}.log")
    return out


@pytest.fixture(scope="session")
def one_rank(tiny_assets, work, eight_records, initial_projector):
    return _stage1(tiny_assets, work, eight_records, initial_projector, "ds1", 1, runs.ZERO2)


@pytest.fixture(scope="session")
def zero2(tiny_assets, work, eight_records, initial_projector):
    return _stage1(tiny_assets, work, eight_records, initial_projector, "zero2", 2, runs.ZERO2)


@pytest.fixture(scope="session")
def zero3(tiny_assets, work, eight_records, initial_projector):
    return _stage1(tiny_assets, work, eight_records, initial_projector, "zero3", 2, runs.ZERO3)


@pytest.mark.parametrize("name,tol", [("zero2", 1e-5), ("zero3", 5e-4)])
def test_two_ranks_match_one_process_and_both_terms_fall(request, one_rank, name, tol):
    ref, logs = runs.train_logs(one_rank), runs.train_logs(request.getfixturevalue(name))
    assert len(logs) == len(ref) == STEPS
    # same global batch, negatives gathered from both ranks: the same contrastive loss
    assert logs[0]["contrastive_loss"] == pytest.approx(ref[0]["contrastive_loss"], abs=tol)
    assert logs[0]["negatives"] == ref[0]["negatives"] == 7
    for key in ("ntp_loss", "contrastive_loss"):
        values = runs.series(logs, key)
        assert values[-1] < values[0] - 0.02, (key, values)
        assert runs.series(ref, key)[-1] < runs.series(ref, key)[0] - 0.02


@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_projector_saved_full_shape_with_upstream_keys(request, one_rank, name):
    out = request.getfixturevalue(name)
    mine = torch.load(out / "mm_projector.bin", weights_only=True)
    ref = torch.load(one_rank / "mm_projector.bin", weights_only=True)
    assert sorted(mine) == sorted(ref)
    for k in ref:
        assert mine[k].shape == ref[k].shape and mine[k].numel() > 0
    assert (out / "contrastive_head.safetensors").exists()


def test_upstream_stage2_lora_zero3_trains_from_contrastive_projector(tiny_assets, work, zero3):
    out = work / "stage2"
    args = [
        "--deepspeed", str(runs.ZERO3), "--lora_enable", "True", "--lora_r", "8", "--lora_alpha", "16",
        "--mm_projector_lr", "2e-5", "--model_name_or_path", str(tiny_assets.llm_dir), "--version", "v1",
        "--data_path", str(tiny_assets.instruct_json), "--image_folder", str(tiny_assets.instruct_image_folder),
        "--vision_tower", str(tiny_assets.vision_dir), "--pretrain_mm_mlp_adapter", str(zero3 / "mm_projector.bin"),
        "--mm_projector_type", "mlp2x_gelu", "--mm_vision_select_layer", "-2", "--mm_use_im_start_end", "False",
        "--mm_use_im_patch_token", "False", "--image_aspect_ratio", "pad", "--group_by_modality_length", "True",
        "--output_dir", str(out), "--max_steps", "4", "--per_device_train_batch_size", "4",
        "--learning_rate", "2e-4", "--weight_decay", "0.", "--warmup_ratio", "0.03", "--lr_scheduler_type", "cosine",
        "--logging_steps", "1", "--save_strategy", "no", "--model_max_length", "256",
        "--dataloader_num_workers", "0", "--lazy_preprocess", "True", "--report_to", "none",
        "--contrastive_weight", "0",
    ]
    runs.run("llava_contrastive.train", args, nproc=2, log=work / "stage2.log")
    logs = runs.train_logs(out)
    assert len(logs) == 4 and all(0 < h["loss"] < 20 for h in logs)
    assert (out / "adapter_model.safetensors").exists() and (out / "non_lora_trainables.bin").exists()
    non_lora = torch.load(out / "non_lora_trainables.bin", weights_only=True)
    assert any("mm_projector" in k for k in non_lora)


def test_zero2_checkpoint_excludes_frozen_llm_and_resumes(tiny_assets, work, eight_records, initial_projector, zero2):
    """DeepSpeed stage-1 checkpoints hold the trainable parameters only; re-running the command
    after losing the last checkpoint resumes from the previous one with the same losses."""
    import shutil

    out = work / "zero2_resume"
    args = runs.stage1_args(tiny_assets, out, steps=STEPS, batch=4, extra=[
        "--data_path", str(eight_records), "--pretrain_mm_mlp_adapter", str(initial_projector),
        "--deepspeed", str(runs.ZERO2), "--save_steps", "3"])
    runs.run("llava_contrastive.train", args, nproc=2, log=work / "zero2_resume_a.log")
    states = list((out / "checkpoint-3").glob("global_step3/*model_states.pt"))
    assert states, sorted(p.name for p in (out / "checkpoint-3").rglob("*"))
    module = torch.load(states[0], map_location="cpu", weights_only=False)["module"]
    assert module and all("mm_projector" in k or "contrastive_head" in k for k in module), sorted(module)[:5]

    shutil.rmtree(out / "checkpoint-6")
    for name in ("mm_projector.bin", "trainer_state.json", "contrastive_head.safetensors"):
        (out / name).unlink()
    runs.run("llava_contrastive.train", args, nproc=2, log=work / "zero2_resume_b.log")
    resumed, reference = runs.train_logs(out), runs.train_logs(zero2)
    assert [h["step"] for h in resumed] == list(range(1, STEPS + 1))
    for a, b in zip(resumed, reference):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), (a, b)
    mine = torch.load(out / "mm_projector.bin", weights_only=True)
    ref = torch.load(zero2 / "mm_projector.bin", weights_only=True)
    for k in ref:
        torch.testing.assert_close(mine[k], ref[k], rtol=0, atol=1e-6)
