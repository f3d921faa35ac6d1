"""--report_to tensorboard / wandb (offline) receive the joint-loss metrics, read back from their files."""
from __future__ import annotations

import pytest

from tests.host import runs
from tests.logger_files import check_tensorboard, check_wandb


@pytest.fixture(scope="module")
def logged_run(tiny_assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("loggers") / "run"
    args = runs.stage1_args(tiny_assets, out, steps=3, extra=[
        "--report_to", "tensorboard", "wandb", "--logging_dir", str(out / "tb"), "--run_name", "loggers-test"])
    runs.run("llava_contrastive.train", args, log=out.parent / "train.log",
             extra_env={"WANDB_MODE": "offline", "WANDB_DIR": str(out), "WANDB_SILENT": "true"})
    return out


def test_tensorboard_receives_the_joint_loss_metrics(logged_run):
    check_tensorboard(logged_run, steps=[1, 2, 3])


def test_wandb_offline_receives_the_same_metrics(logged_run):
    check_wandb(logged_run, steps=[1, 2, 3])
