"""Stage 1 with the upstream host, single process: the real CLI on the tiny assets."""
from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
import torch

from tests.host import runs

pytestmark = pytest.mark.slow


def _mean(xs):
    return sum(xs) / len(xs)


def test_joint_training_lowers_both_terms(joint_run):
    logs = runs.train_logs(joint_run)
    assert len(logs) == 16
    ntp, con = runs.series(logs, "ntp_loss"), runs.series(logs, "contrastive_loss")
    assert _mean(ntp[-4:]) < _mean(ntp[:4]) - 0.05, ntp
    assert _mean(con[-4:]) < _mean(con[:4]) - 0.05, con
    for h in logs:  # what the trainer logs each step
        assert {"ntp_loss", "contrastive_loss", "logit_scale", "negatives", "i2t_acc", "t2i_acc"} <= set(h)
        assert h["negatives"] == 7  # batch 8, one rank
        assert h["logit_scale"] <= 100
        assert abs(h["loss"] - (h["ntp_loss"] + 0.5 * h["contrastive_loss"])) < 1e-3


def test_outputs_upstream_files_and_head(joint_run):
    proj = torch.load(joint_run / "mm_projector.bin", weights_only=True)
    assert sorted(proj) == ["model.mm_projector.0.bias", "model.mm_projector.0.weight",
                            "model.mm_projector.2.bias", "model.mm_projector.2.weight"]
    cfg = json.loads((joint_run / "config.json").read_text())
    assert cfg["model_type"] == "llava_llama" and cfg["mm_projector_type"] == "mlp2x_gelu"
    assert cfg["contrastive"]["contrastive_weight"] == 0.5
    from safetensors.torch import load_file

    head = load_file(str(joint_run / "contrastive_head.safetensors"))
    assert set(head) == {"scale.log_scale"}
    assert json.loads((joint_run / "contrastive_config.json").read_text())["contrastive_loss"] == "infonce"


def test_projector_loads_strictly_into_upstream(tiny_assets, joint_run):
    """Upstream stage 2's loader (`initialize_vision_modules`, strict load_state_dict)."""
    from types import SimpleNamespace

    from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM

    model = LlavaLlamaForCausalLM.from_pretrained(str(tiny_assets.llm_dir))
    args = SimpleNamespace(vision_tower=str(tiny_assets.vision_dir), mm_vision_select_layer=-2,
                           mm_vision_select_feature="patch", pretrain_mm_mlp_adapter=str(joint_run / "mm_projector.bin"),
                           mm_patch_merge_type="flat", mm_projector_type="mlp2x_gelu")
    model.get_model().initialize_vision_modules(model_args=args)
    saved = torch.load(joint_run / "mm_projector.bin", weights_only=True)
    for k, v in model.get_model().mm_projector.state_dict().items():
        assert torch.equal(v, saved[f"model.mm_projector.{k}"])


def test_weight_zero_reproduces_upstream_step_for_step(upstream_run, weight0_run):
    ours, theirs = runs.train_logs(weight0_run), runs.train_logs(upstream_run)
    assert len(ours) == len(theirs) == 8
    for a, b in zip(ours, theirs):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6), (a, b)
        assert "contrastive_loss" not in a
    mine = torch.load(weight0_run / "mm_projector.bin", weights_only=True)
    base = torch.load(upstream_run / "mm_projector.bin", weights_only=True)
    assert mine.keys() == base.keys()
    for k in mine:
        torch.testing.assert_close(mine[k], base[k], rtol=0, atol=1e-6)


def test_sigkill_in_training_and_in_save_then_rerun_matches_uninterrupted(tiny_assets, work, joint_run):
    """SIGKILL during training (after the first checkpoint), re-run, SIGKILL in the middle of writing
    a checkpoint, re-run: the losses of every step and the final projector equal those of the
    uninterrupted run (which also shows that the seed fixes the projector init)."""
    out = work / "resume"
    args = runs.stage1_args(tiny_assets, out, steps=16, extra=["--save_steps", "6", "--save_total_limit", "1"])
    proc = subprocess.Popen(runs.command("llava_contrastive.train", args), cwd=runs.REPO, env=runs.env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (out / "checkpoint-6").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "checkpoint-6").exists() and not (out / "mm_projector.bin").exists()

    killed = runs.run("llava_contrastive.train", args, check=False, log=work / "resume_killed_in_save.log",
                      extra_env={"LLAVA_CONTRASTIVE_FAULTS": "kill_in_save@12"})
    assert killed.returncode == -signal.SIGKILL
    assert (out / "tmp-checkpoint-12").exists() and not (out / "checkpoint-12").exists()
    assert (out / "checkpoint-6" / "trainer_state.json").exists()  # save_total_limit 1 kept the good one

    runs.run("llava_contrastive.train", args, log=work / "resume.log")
    assert not (out / "tmp-checkpoint-12").exists()
    resumed, reference = runs.train_logs(out), runs.train_logs(joint_run)
    assert [h["step"] for h in resumed] == list(range(1, 17))
    for a, b in zip(resumed, reference):
        for key in ("loss", "ntp_loss", "contrastive_loss"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (key, a, b)
    mine = torch.load(out / "mm_projector.bin", weights_only=True)
    ref = torch.load(joint_run / "mm_projector.bin", weights_only=True)
    for k in ref:
        torch.testing.assert_close(mine[k], ref[k], rtol=0, atol=1e-6)


def test_nonfinite_loss_stops_at_its_step_and_keeps_the_checkpoint(tiny_assets, work):
    out = work / "nan"
    args = runs.stage1_args(tiny_assets, out, steps=8, extra=["--save_steps", "2"])
    proc = runs.run("llava_contrastive.train", args, check=False, log=work / "nan.log",
                    extra_env={"LLAVA_CONTRASTIVE_FAULTS": "nonfinite_loss@5"})
    assert proc.returncode != 0
    assert "non-finite loss at optimizer step 5" in proc.stderr and "loss=nan" in proc.stderr
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not (out / "mm_projector.bin").exists()

    skipped = work / "nan_skip"
    args = runs.stage1_args(tiny_assets, skipped, steps=8, extra=["--nonfinite_max_skips", "1"])
    proc = runs.run("llava_contrastive.train", args, log=work / "nan_skip.log",
                    extra_env={"LLAVA_CONTRASTIVE_FAULTS": "nonfinite_loss@5"})
    assert "non-finite loss at step 5" in proc.stderr and "[1/1]" in proc.stderr
    logs = runs.train_logs(skipped)
    assert len(logs) == 8 and all(h["ntp_loss"] == h["ntp_loss"] for h in logs)
    proj = torch.load(skipped / "mm_projector.bin", weights_only=True)
    assert all(torch.isfinite(v).all() for v in proj.values())


def test_runs_as_a_file_like_upstream(tiny_assets, work):
    """`deepspeed llava_contrastive/train.py ...` runs the file: the package directory must not
    shadow the standard library (the core has a queue.py)."""
    import sys

    out = work / "as_file"
    proc = subprocess.run([sys.executable, "llava_contrastive/train.py", *runs.stage1_args(tiny_assets, out, steps=2)],
                          cwd=runs.REPO, env=runs.env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(runs.train_logs(out)) == 2 and (out / "mm_projector.bin").exists()
