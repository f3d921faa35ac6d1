"""python -m llava_contrastive.hosts.hf.train on the tiny assets: 1 process in-process, 2 ranks ZeRO-3."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from host.runs import free_port

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
    from llava_contrastive.hosts.hf import train

    trainer = train.run(["--llm_dir", str(tiny_assets.llm_dir), "--vision_dir", str(tiny_assets.vision_dir)]
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
    # the head in the upstream host's format (portable between hosts)
    from safetensors.torch import load_file
    assert set(load_file(str(out / "contrastive_head.safetensors"))) == {"scale.log_scale"}
    assert json.loads((out / "contrastive_config.json").read_text())["contrastive_weight"] == 0.5
    assert not (out / "contrastive_head.bin").exists()
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    native = LlavaForConditionalGeneration.from_pretrained(str(out))
    AutoProcessor.from_pretrained(str(out))
    assert torch.equal(native.model.multi_modal_projector.linear_1.weight, up["model.mm_projector.0.weight"])


@pytest.mark.distributed
def test_stage1_two_ranks_zero3(tiny_assets, native_dir, tmp_path):
    """2 ranks x 8 rows under ZeRO-3 = 1 process x 16 rows at step 1: the contrastive loss (negatives
    gathered across ranks, exact) is the single-process value."""
    ds = {"zero_optimization": {"stage": 3}, "gradient_accumulation_steps": 1,
          "train_micro_batch_size_per_gpu": "auto", "gradient_clipping": "auto", "bf16": {"enabled": False}}
    cfg = tmp_path / "zero3.json"
    cfg.write_text(json.dumps(ds))
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", LLAVA_CONTRASTIVE_QUIET="1",
               PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
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

    from llava_contrastive.hosts.hf import train

    single = train.run(["--model_name_or_path", str(native_dir)]
                        + common_args(tiny_assets, tmp_path / "single", steps=1, batch=16))
    first = [h for h in single.state.log_history if "contrastive_loss" in h][0]
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]  # unrounded, unlike stdout
    two = [h for h in history if "contrastive_loss" in h][0]
    print(f"step-1 contrastive loss: 1 process {first['contrastive_loss']:.6f}, 2 ranks ZeRO-3 {two['contrastive_loss']:.6f}")
    assert abs(first["contrastive_loss"] - two["contrastive_loss"]) < 1e-4
    assert abs(first["ntp_loss"] - two["ntp_loss"]) < 2e-2  # per-rank token means, averaged


def equal_length_records(tiny_assets, native_dir, n: int) -> list:
    """n records whose captions have the same token count: per-rank NTP means then average to the
    global mean, so 2 ranks must reproduce the 1-process gradient exactly (both terms)."""
    from collections import defaultdict

    from transformers import AutoProcessor

    tok = AutoProcessor.from_pretrained(str(native_dir)).tokenizer
    by_len = defaultdict(list)
    for r in json.loads(tiny_assets.pretrain_json.read_text())[:2000]:
        by_len[len(tok(r["conversations"][1]["value"] + "\n", add_special_tokens=False).input_ids)].append(r)
    records = max(by_len.values(), key=len)
    assert len(records) >= n
    return records[:n]


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_step_equals_one_process(tiny_assets, native_dir, tmp_path, stage):
    """One SGD step with the repository's DeepSpeed configs (scripts/zero2.json, zero3.json): the
    projector and logit scale after 2 ranks x 8 rows equal those after 1 process x 16 rows. Catches
    any rank-count factor on either term (e.g. transformers 5's token-count loss scaling applied to
    the contrastive term)."""
    data = tmp_path / "equal.json"
    data.write_text(json.dumps(equal_length_records(tiny_assets, native_dir, 16)))
    cfg = REPO / "scripts" / f"zero{stage}.json"

    def args(out, batch):
        a = common_args(tiny_assets, out, steps=1, batch=batch)
        a[a.index("--data_path") + 1] = str(data)
        a[a.index("--learning_rate") + 1] = "0.5"
        # gradient clipping stays at the default 1.0: the repository's configs have no
        # "gradient_clipping" key and DeepSpeed then clips at 1.0 whatever --max_grad_norm says
        return a + ["--optim", "sgd", "--lr_scheduler_type", "constant", "--weight_decay", "0",
                    "--contrastive_weight", "2.0"]

    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", LLAVA_CONTRASTIVE_QUIET="1",
               PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "llava_contrastive.hosts.hf.train", "--model_name_or_path", str(native_dir),
           "--deepspeed", str(cfg)] + args(tmp_path / "two", 8)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-4000:]

    from llava_contrastive.hosts.hf import train

    train.run(["--model_name_or_path", str(native_dir)] + args(tmp_path / "one", 16))
    one = torch.load(tmp_path / "one" / "mm_projector.bin", weights_only=True)
    two = torch.load(tmp_path / "two" / "mm_projector.bin", weights_only=True)
    from transformers import LlavaForConditionalGeneration

    init = LlavaForConditionalGeneration.from_pretrained(str(native_dir)).model.multi_modal_projector.state_dict()
    for k, v in one.items():
        native = init[k.replace("model.mm_projector.0.", "linear_1.").replace("model.mm_projector.2.", "linear_2.")]
        step = (v - native).norm()
        assert step > 1e-3, k  # the step moved the weights
        rel = float((two[k] - v).norm() / step)
        print(f"{k}: |step| {float(step):.4g}, |2 ranks - 1 process| / |step| {rel:.2e}")
        assert rel < 1e-4, k
    from safetensors.torch import load_file

    s1 = load_file(str(tmp_path / "one" / "contrastive_head.safetensors"))["scale.log_scale"]
    s2 = load_file(str(tmp_path / "two" / "contrastive_head.safetensors"))["scale.log_scale"]
    assert torch.allclose(s1, s2, rtol=0, atol=1e-6), (s1, s2)
