"""Native stage 2 (LoRA, the projector in PEFT's modules_to_save) killed with SIGKILL in the middle of a
checkpoint save: the same command resumes to bitwise the same adapter (LoRA and projector) and logged
losses as an uninterrupted run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
STEPS = 6


def _run(tiny_assets, native_dir, out, faults=""):
    cmd = [sys.executable, "-m", "llava_contrastive.hosts.hf.finetune", "--model_name_or_path", str(native_dir),
           "--data_path", str(tiny_assets.instruct_json), "--image_folder", str(tiny_assets.instruct_image_folder),
           "--output_dir", str(out), "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0",
           "--learning_rate", "2e-3", "--mm_projector_lr", "2e-4", "--max_steps", str(STEPS),
           "--per_device_train_batch_size", "4", "--save_strategy", "steps", "--save_steps", "2",
           "--logging_steps", "1", "--model_max_length", "256", "--image_aspect_ratio", "pad", "--report_to", "none",
           "--dataloader_num_workers", "0", "--disable_tqdm", "true", "--seed", "0"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CUDA_VISIBLE_DEVICES="",
               LLAVA_CONTRASTIVE_QUIET="1", LLAVA_CONTRASTIVE_FAULTS=faults, PYTHONPATH=str(REPO))
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=str(REPO))


def test_sigkill_in_save_then_rerun_matches_uninterrupted(tiny_assets, native_dir, tmp_path):
    reference = tmp_path / "reference"
    proc = _run(tiny_assets, native_dir, reference)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "interrupted"
    killed = _run(tiny_assets, native_dir, out, faults=f"kill_in_save@{STEPS}")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (out / "checkpoint-4" / "trainer_state.json").is_file()
    assert not (out / f"checkpoint-{STEPS}" / "trainer_state.json").exists()  # killed in the middle
    resumed = _run(tiny_assets, native_dir, out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr and "checkpoint-4" in resumed.stderr

    def losses(d):
        return [(h["step"], h["loss"]) for h in json.loads((d / "trainer_state.json").read_text())["log_history"]
                if "loss" in h]

    assert losses(out) == losses(reference) and len(losses(out)) == STEPS
    mine, theirs = (load_file(str(d / "adapter_model.safetensors")) for d in (out, reference))
    assert sorted(mine) == sorted(theirs) and any("multi_modal_projector" in k for k in mine)
    for k in theirs:
        assert torch.equal(mine[k], theirs[k]), k
