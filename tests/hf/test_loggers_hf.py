"""Native host: --report_to tensorboard / wandb (offline) receive the joint-loss metrics, read back from their files."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.logger_files import check_tensorboard, check_wandb

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def logged_run(tiny_assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("loggers-hf") / "run"
    cmd = [sys.executable, "-m", "llava_contrastive.hosts.hf.train", "--llm_dir", str(tiny_assets.llm_dir),
           "--vision_dir", str(tiny_assets.vision_dir), "--data_path", str(tiny_assets.pretrain_json),
           "--image_folder", str(tiny_assets.image_folder), "--output_dir", str(out),
           "--per_device_train_batch_size", "8", "--learning_rate", "1e-3", "--max_steps", "3", "--logging_steps", "1",
           "--save_strategy", "no", "--dataloader_num_workers", "0", "--disable_tqdm", "true", "--seed", "0",
           "--report_to", "tensorboard", "wandb", "--logging_dir", str(out / "tb"), "--run_name", "loggers-test"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="offline", WANDB_DIR=str(out),
               WANDB_SILENT="true", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def test_tensorboard_receives_the_joint_loss_metrics(logged_run):
    check_tensorboard(logged_run, steps=[1, 2, 3])


def test_wandb_offline_receives_the_same_metrics(logged_run):
    check_wandb(logged_run, steps=[1, 2, 3])
