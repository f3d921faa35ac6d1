"""python -m llava_contrastive.hosts.hf.train on the tiny assets: 1 process in-process, 2 ranks ZeRO-3."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def common_args(tiny_assets, out, steps=15, batch=16):
    return ["--data_path", str(tiny_assets.pretrain_json), "--image_folder", str(tiny_assets.image_folder),
            "--output_dir", str(out), "--per_device_train_batch_size", str(batch), "--learning_rate", "2e-3",
            "--max_steps", str(steps), "--logging_steps", "1", "--report_to", "none", "--save_strategy", "no",
            "--dataloader_num_workers", "0", "--disable_tqdm", "true", "--seed", "0",
            "--contrastive_weight", "0.5"]


def mean(xs):
    return sum(xs) / len(xs)


def test_stage1_one_process_both_losses_fall(tiny_assets, tmp_path):
    from llava_contrastive.hosts.hf import convert, train

    trainer = train.main(["--llm_dir", str(tiny_assets.llm_dir), "--vision_dir", str(tiny_assets.vision_dir)]
                         + common_args(tiny_assets, tmp_path / "out"))
    logs = [h for h in trainer.state.log_history if "ntp_loss" in h]
    assert len(logs) == 15
    ntp = [h["ntp_loss"] for h in logs]
    con = [h["contrastive_loss"] for h in logs]
    assert mean(ntp[-4:]) < mean(ntp[:4]) - 0.05, ntp
    assert mean(con[-4:]) < mean(con[:4]) - 0.1, con
    assert all("logit_scale" in h for h in logs)
    # only the projector and the head trained; outputs are upstream-compatible
    names = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert names and all(n.startswith(("model.multi_modal_projector.", "contrastive_head.")) for n in names)
    out = tmp_path / "out"
    up = torch.load(out / "mm_projector.bin", weights_only=True)
    assert sorted(up) == sorted(f"model.mm_projector.{i}.{p}" for i in (0, 2) for p in ("weight", "bias"))
    assert (out / "contrastive_head.bin").exists()
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    native = LlavaForConditionalGeneration.from_pretrained(str(out))
    AutoProcessor.from_pretrained(str(out))
    assert torch.equal(native.model.multi_modal_projector.linear_1.weight, up["model.mm_projector.0.weight"])


@pytest.mark.distributed
def test_stage1_two_ranks_zero3(tiny_assets, native_dir, tmp_path):
    ds = {"zero_optimization": {"stage": 3}, "gradient_accumulation_steps": 1,
          "train_micro_batch_size_per_gpu": "auto", "gradient_clipping": "auto", "bf16": {"enabled": False}}
    cfg = tmp_path / "zero3.json"
    cfg.write_text(json.dumps(ds))
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", LLAVA_CONTRASTIVE_QUIET="1",
               PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29613",
           "-m", "llava_contrastive.hosts.hf.train", "--model_name_or_path", str(native_dir),
           "--deepspeed", str(cfg), "--use_cpu", "true"] \
        + common_args(tiny_assets, out, steps=6, batch=8)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-4000:]
    logs = [json.loads(line.replace("'", '"')) for line in proc.stdout.splitlines() + proc.stderr.splitlines()
            if line.startswith("{'loss'")]
    assert len(logs) == 6, (proc.stdout[-2000:], proc.stderr[-2000:])
    assert all("contrastive_loss" in h for h in logs)
    # use_cpu: the two ranks split the data (2 x 8 rows per step), not each the whole set
    assert abs(float(logs[-1]["epoch"]) - 6 * 16 / 8000) < 1e-3, logs[-1]
    up = torch.load(out / "mm_projector.bin", weights_only=True)
    assert up["model.mm_projector.0.weight"].shape == (64, 64)
