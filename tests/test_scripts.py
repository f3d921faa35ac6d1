"""scripts/lib.sh: the node count and launcher of a multi-node launch (the global batch depends on it),
checked with DRY_RUN=1 (plan and command printed, nothing started)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _nodes(tmp_path: Path, hostfile_text: str | None, nnodes: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable)  # lib.sh then installs nothing
    env.pop("NNODES", None)
    env.pop("HOSTFILE", None)
    if hostfile_text is not None:
        (tmp_path / "hostfile").write_text(hostfile_text)
        env["HOSTFILE"] = str(tmp_path / "hostfile")
    if nnodes is not None:
        env["NNODES"] = nnodes
    return subprocess.run(["bash", "-c", f'source "{REPO}/scripts/lib.sh"; resolve_nodes; echo "$NNODES"'],
                          capture_output=True, text=True, env=env, timeout=60)


def test_hostfile_implies_the_node_count(tmp_path):
    out = _nodes(tmp_path, "# two nodes\nnode1 slots=8\n\nnode2 slots=8\n", None)
    assert out.returncode == 0 and out.stdout.strip() == "2", out.stderr


def test_nnodes_disagreeing_with_the_hostfile_is_refused(tmp_path):
    out = _nodes(tmp_path, "node1 slots=8\nnode2 slots=8\n", "1")
    assert out.returncode == 2
    assert "NNODES=1 but HOSTFILE" in out.stderr and "lists 2 host(s)" in out.stderr


def test_defaults_and_agreement(tmp_path):
    assert _nodes(tmp_path, None, None).stdout.strip() == "1"
    assert _nodes(tmp_path, "node1 slots=8\nnode2 slots=8\n", "2").stdout.strip() == "2"
    missing = subprocess.run(["bash", "-c", f'source "{REPO}/scripts/lib.sh"; HOSTFILE=/nonexistent resolve_nodes'],
                             capture_output=True, text=True, env=dict(os.environ, PYTHON=sys.executable), timeout=60)
    assert missing.returncode == 2 and "no such file" in missing.stderr


# ---- dry-run launches (DRY_RUN=1): the plan each multi-node launcher prints, and its command ----------
_LAUNCH_ENV = ("HOSTFILE", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "LAUNCHER", "NUM_GPUS", "GLOBAL_BATCH",
               "PER_DEVICE_BATCH", "SLURM_JOB_ID", "SLURM_JOB_NUM_NODES", "SLURM_JOB_NODELIST", "CONTRASTIVE_WEIGHT")


def _dry_run(tmp_path: Path, script: str = "pretrain_contrastive.sh", **settings: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_ENV}
    env.update(PYTHON=sys.executable, DRY_RUN="1", MODEL="/models/vicuna-13b", VISION_TOWER="/models/clip-336",
               DATA_PATH="/data/558k.json", IMAGE_FOLDER="/data/images", OUTPUT_DIR=str(tmp_path / "out"),
               PROJECTOR_FILE="/runs/mm_projector.bin", MASTER_PORT="29999", **settings)
    return subprocess.run(["bash", str(REPO / "scripts" / script)], capture_output=True, text=True, env=env,
                          timeout=120, cwd=tmp_path)


def _command(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 0, out.stderr
    lines = [l for l in out.stderr.splitlines() if l.startswith("dry run (DRY_RUN=1), not started:")]
    assert len(lines) == 1, out.stderr
    return lines[0]


def test_dry_run_deepspeed_hostfile(tmp_path):
    (tmp_path / "hostfile").write_text("node1 slots=8\nnode2 slots=8\n")
    out = _dry_run(tmp_path, HOSTFILE=str(tmp_path / "hostfile"), NUM_GPUS="8")
    assert ("pretrain_contrastive: launcher deepspeed-hostfile, world size 16 (2 node(s) x 8) x batch 16 x "
            "accumulation 1 = global batch 256; contrastive negatives per sample: 255") in out.stderr
    cmd = _command(out)
    assert f"-m deepspeed.launcher.runner --hostfile {tmp_path / 'hostfile'} --num_nodes 2 --num_gpus 8 " \
           f"--master_port 29999 --module llava_contrastive.train" in cmd
    assert "--gradient_accumulation_steps 1" in cmd and "--per_device_train_batch_size 16" in cmd


def test_dry_run_torchrun_on_each_node(tmp_path):
    out = _dry_run(tmp_path, NNODES="2", NODE_RANK="1", MASTER_ADDR="10.0.0.1", NUM_GPUS="4", PER_DEVICE_BATCH="16")
    assert ("launcher torchrun-multinode, world size 8 (2 node(s) x 4) x batch 16 x accumulation 2 = global batch "
            "256; contrastive negatives per sample: 127") in out.stderr
    assert "-m torch.distributed.run --nnodes 2 --node_rank 1 --nproc_per_node 4 --master_addr 10.0.0.1 " \
           "--master_port 29999 -m llava_contrastive.train" in _command(out)


def test_dry_run_slurm(tmp_path):
    out = _dry_run(tmp_path, SLURM_JOB_ID="4711", SLURM_JOB_NUM_NODES="4", MASTER_ADDR="gpu-a01", NUM_GPUS="8")
    assert "launcher slurm, world size 32 (4 node(s) x 8) x batch 8 x accumulation 1 = global batch 256; " \
           "contrastive negatives per sample: 255" in out.stderr
    assert "srun --nodes 4 --ntasks-per-node 1 --kill-on-bad-exit 1 " in _command(out)
    assert "-m torch.distributed.run --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint " \
           "gpu-a01:29999 --rdzv_id 4711 -m llava_contrastive.train" in _command(out)


def test_dry_run_stage2_plan_has_no_negatives(tmp_path):
    out = _dry_run(tmp_path, "finetune_lora.sh", NNODES="2", NODE_RANK="0", MASTER_ADDR="10.0.0.1", NUM_GPUS="8")
    assert "finetune: launcher torchrun-multinode, world size 16 (2 node(s) x 8) x batch 8 x accumulation 1 = " \
           "global batch 128" in out.stderr and "negatives" not in out.stderr
    assert "--lora_enable True" in _command(out)


@pytest.mark.parametrize("settings, message", [
    (dict(NNODES="2", NUM_GPUS="8"), "run this script on every node with NODE_RANK"),
    (dict(SLURM_JOB_ID="1", SLURM_JOB_NUM_NODES="2", NNODES="4", MASTER_ADDR="a", NUM_GPUS="8"),
     "NNODES=4 but the SLURM allocation has 2 node(s)"),
    (dict(LAUNCHER="slurm", NUM_GPUS="8"), "outside a SLURM allocation"),
    (dict(LAUNCHER="torchrun", NNODES="2", NUM_GPUS="8"), "runs on one node but NNODES=2"),
    (dict(LAUNCHER="mpi", NUM_GPUS="8"), "LAUNCHER=mpi: expected"),
    (dict(NNODES="2", NODE_RANK="0", MASTER_ADDR="a", NUM_GPUS="8", GLOBAL_BATCH="100"),
     "GLOBAL_BATCH=100 is not a multiple of ranks (16 = 2 node(s) x 8)"),
])
def test_launch_mistakes_refused_before_anything_starts(tmp_path, settings, message):
    out = _dry_run(tmp_path, **settings)
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert "dry run" not in out.stderr
