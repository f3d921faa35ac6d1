"""Resumable stage-1 checkpoints of the native host: real subprocess runs of
``python -m llava_contrastive.hosts.hf.train`` on the tiny assets.

* a checkpoint holds the trainable state only (projector in upstream keys, head, optimizer, scheduler,
  RNG, trainer state), never the frozen LLM
* SIGKILL during training, re-run (auto-resume), SIGKILL in the middle of a save, re-run: every
  logged loss and the final projector / head equal those of an uninterrupted run
* 2 ranks under ZeRO-3 (scripts/zero3.json): the engine checkpoint excludes the frozen LLM and
  ``--resume_from_checkpoint`` continues exactly
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from host.runs import free_port

REPO = Path(__file__).resolve().parents[2]
ENTRY = "llava_contrastive.hosts.hf.train"
LOSS_KEYS = ("loss", "ntp_loss", "contrastive_loss")
PROJECTOR_KEYS = sorted(f"model.mm_projector.{i}.{p}" for i in (0, 2) for p in ("weight", "bias"))

pytestmark = pytest.mark.slow


# ---- helpers ------------------------------------------------------------------------------------


def train_args(tiny_assets, native_dir, out, *, steps=12, save=4, batch=8, extra=()):
    return ["--model_name_or_path", str(native_dir), "--data_path", str(tiny_assets.pretrain_json),
            "--image_folder", str(tiny_assets.image_folder), "--output_dir", str(out),
            "--per_device_train_batch_size", str(batch), "--learning_rate", "2e-3", "--lr_scheduler_type", "cosine",
            "--warmup_steps", "2", "--max_steps", str(steps), "--logging_steps", "1", "--save_strategy", "steps",
            "--save_steps", str(save), "--report_to", "none", "--dataloader_num_workers", "0",
            "--disable_tqdm", "true", "--seed", "0", "--contrastive_weight", "0.5", *extra]


def env(nproc=1, **extra):
    e = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", LLAVA_CONTRASTIVE_QUIET="1",
             PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    e.pop("LLAVA_CONTRASTIVE_FAULTS", None)
    if nproc > 1:
        e["OMP_NUM_THREADS"] = "1"
    e.update(extra)
    return e


def command(args, nproc=1):
    if nproc == 1:
        return [sys.executable, "-m", ENTRY, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(free_port()), "-m", ENTRY, *args]


def run(args, *, nproc=1, check=True, log=None, **extra_env):
    proc = subprocess.run(command(args, nproc), cwd=str(REPO), env=env(nproc, **extra_env), capture_output=True,
                          text=True, timeout=600)
    if log is not None:
        Path(log).write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    if check:
        assert proc.returncode == 0, proc.stderr[-6000:]
    return proc


def logs(out: Path):
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [h for h in history if "loss" in h and "step" in h]


def assert_same_run(resumed: Path, reference: Path, steps: int):
    mine, ref = logs(resumed), logs(reference)
    assert [h["step"] for h in mine] == [h["step"] for h in ref] == list(range(1, steps + 1))
    for a, b in zip(mine, ref):
        for key in LOSS_KEYS:
            assert a[key] == pytest.approx(b[key], abs=1e-5), (key, a, b)
        assert a["logit_scale"] == b["logit_scale"], (a, b)
    p, q = (torch.load(d / "mm_projector.bin", weights_only=True) for d in (resumed, reference))
    assert sorted(p) == sorted(q) == PROJECTOR_KEYS
    for k in q:
        torch.testing.assert_close(p[k], q[k], rtol=0, atol=1e-6)
    from safetensors.torch import load_file

    h, g = (load_file(str(d / "contrastive_head.safetensors")) for d in (resumed, reference))
    assert h.keys() == g.keys() == {"scale.log_scale"}
    assert torch.equal(h["scale.log_scale"], g["scale.log_scale"])
    return mine, ref


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ---- runs ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(tiny_assets, native_dir, tmp_path_factory):
    """Uninterrupted: 12 steps, a checkpoint every 4."""
    out = tmp_path_factory.mktemp("resume") / "reference"
    run(train_args(tiny_assets, native_dir, out), log=out.parent / "reference.log")
    return out


def test_checkpoint_holds_only_the_trainable_state(reference, native_dir):
    assert sorted(p.name for p in reference.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-4", "checkpoint-8"]
    assert not list(reference.glob("tmp-*"))
    ck = reference / "checkpoint-4"
    names = {p.name for p in ck.iterdir()}
    assert names == {"mm_projector.bin", "contrastive_head.safetensors", "contrastive_config.json", "optimizer.pt",
                     "scheduler.pt", "rng_state.pth", "trainer_state.json", "manifest.json",
                     "elastic_optimizer.pt", "run_shape.json"}, names  # the last two: resume on another world size
    assert not list(ck.glob("model*.safetensors")) and not list(ck.glob("pytorch_model*.bin"))
    model_bytes = (native_dir / "model.safetensors").stat().st_size
    assert dir_bytes(ck) < model_bytes / 4, (dir_bytes(ck), model_bytes)  # tiny: ~144 KB vs 1.3 MB
    proj = torch.load(ck / "mm_projector.bin", weights_only=True)
    assert sorted(proj) == PROJECTOR_KEYS and proj["model.mm_projector.0.weight"].shape == (64, 64)
    optim = torch.load(ck / "optimizer.pt", weights_only=True)
    assert len(optim["state"]) == 5  # 4 projector tensors + the log logit scale, nothing frozen
    from safetensors.torch import load_file

    head = load_file(str(ck / "contrastive_head.safetensors"))
    assert set(head) == {"scale.log_scale"}
    cfg = json.loads((ck / "contrastive_config.json").read_text())
    assert cfg["contrastive_loss"] == "infonce" and cfg["contrastive_weight"] == 0.5
    state = json.loads((ck / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    # the saved head is the one that produced the logged scale at that step
    logged = [h for h in state["log_history"] if h.get("step") == 4 and "logit_scale" in h][0]["logit_scale"]
    assert float(head["scale.log_scale"].exp()) == pytest.approx(logged, abs=1e-3)
    # final output: the upstream host's head format, no contrastive_head.bin
    assert (reference / "contrastive_head.safetensors").is_file() and (reference / "contrastive_config.json").is_file()
    assert not (reference / "contrastive_head.bin").exists()
    final = torch.load(reference / "mm_projector.bin", weights_only=True)
    last = torch.load(reference / "checkpoint-12" / "mm_projector.bin", weights_only=True)
    assert all(torch.equal(final[k], last[k]) for k in final)
    assert not torch.equal(proj["model.mm_projector.0.weight"], final["model.mm_projector.0.weight"])


def test_sigkill_in_training_and_in_save_then_rerun_matches_uninterrupted(tiny_assets, native_dir, reference, tmp_path):
    out = tmp_path / "run"
    args = train_args(tiny_assets, native_dir, out)

    # 1. SIGKILL while step 6 or 7 runs (after the step-6 log line; checkpoint-4 is complete)
    with open(tmp_path / "killed.stderr", "w") as err:
        proc = subprocess.Popen(command(args), cwd=str(REPO), env=env(), stdout=subprocess.PIPE, stderr=err, text=True)
        seen, deadline = 0, time.time() + 300
        for line in proc.stdout:
            seen += line.startswith("{'loss'")
            if seen >= 6 or time.time() > deadline:
                break
        proc.send_signal(signal.SIGKILL)
        proc.stdout.close()
        proc.wait()
    assert seen == 6 and proc.returncode == -signal.SIGKILL, (seen, proc.returncode)
    assert (out / "checkpoint-4" / "trainer_state.json").is_file()
    assert not (out / "checkpoint-8").exists() and not (out / "mm_projector.bin").exists()

    # 2. re-run: resumes from checkpoint-4, SIGKILLs itself in the middle of writing checkpoint-8
    killed = run(args, check=False, log=tmp_path / "killed_in_save.log", LLAVA_CONTRASTIVE_FAULTS="kill_in_save@8")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert f"resuming from {out / 'checkpoint-4'}" in killed.stderr
    staged = out / "tmp-checkpoint-8"
    assert (staged / "mm_projector.bin").is_file() and not (staged / "trainer_state.json").exists()
    assert not (out / "checkpoint-8").exists()  # nothing that looks like a checkpoint
    # and a torn checkpoint-N written without staging (e.g. by a copy): never resumed from
    torn = out / "checkpoint-12"
    torn.mkdir()
    (torn / "mm_projector.bin").write_bytes((out / "checkpoint-4" / "mm_projector.bin").read_bytes())

    # 3. re-run the same command: last complete checkpoint (4), leftovers removed, finishes
    done = run(args, log=tmp_path / "resumed.log")
    assert f"resuming from {out / 'checkpoint-4'}" in done.stderr
    assert f"removing incomplete checkpoint {staged}" in done.stderr
    assert f"removing incomplete checkpoint {torn}" in done.stderr
    assert not list(out.glob("tmp-*"))
    assert all((out / f"checkpoint-{n}" / "trainer_state.json").is_file() for n in (4, 8, 12))
    mine, ref = assert_same_run(out, reference, steps=12)
    worst = max(abs(a[k] - b[k]) for a, b in zip(mine, ref) for k in LOSS_KEYS)
    print(f"max |loss diff| over 12 steps after two kills: {worst:.3g}")


@pytest.mark.distributed
def test_two_ranks_zero3_checkpoint_excludes_frozen_llm_and_resumes(tiny_assets, native_dir, tmp_path):
    common = ["--deepspeed", str(REPO / "scripts" / "zero3.json"), "--use_cpu", "true"]
    ref = tmp_path / "ref"
    run(train_args(tiny_assets, native_dir, ref, steps=6, save=3, batch=4, extra=common), nproc=2,
        log=tmp_path / "ref.log")
    ck = ref / "checkpoint-3"
    assert {"mm_projector.bin", "contrastive_head.safetensors", "contrastive_config.json", "scheduler.pt",
            "rng_state_0.pth", "rng_state_1.pth", "trainer_state.json", "latest", "global_step3"} <= \
        {p.name for p in ck.iterdir()}
    assert [p.name for p in ck.rglob("*.safetensors")] == ["contrastive_head.safetensors"]
    assert not list(ck.rglob("pytorch_model*.bin"))
    model_states = sorted((ck / "global_step3").glob("*model_states.pt"))
    assert len(model_states) == 2
    saved = torch.load(model_states[0], map_location="cpu", weights_only=False)
    assert all(k.startswith(("model.multi_modal_projector.", "contrastive_head.")) for k in saved["module"]), \
        sorted(saved["module"])[:5]
    assert not saved.get("frozen_param_shapes")
    assert dir_bytes(ck) < (native_dir / "model.safetensors").stat().st_size / 2, dir_bytes(ck)
    assert logs(ref)[-1]["epoch"] == pytest.approx(6 * 8 / 8000, abs=1e-3)  # the ranks split the data

    resumed = tmp_path / "resumed"  # explicit --resume_from_checkpoint into a fresh output_dir
    proc = run(train_args(tiny_assets, native_dir, resumed, steps=6, save=3, batch=4,
                          extra=common + ["--resume_from_checkpoint", str(ck)]), nproc=2, log=tmp_path / "resumed.log")
    assert f"resuming from {ck}" in proc.stderr
    assert_same_run(resumed, ref, steps=6)


def test_checkpoint_directory_helpers(tmp_path):
    """last_complete_checkpoint / clean_incomplete_checkpoints / commit_staged on plain directories."""
    from llava_contrastive.training.checkpointing import (clean_incomplete_checkpoints, commit_staged,
                                                 last_complete_checkpoint, staging_dir)

    assert last_complete_checkpoint(str(tmp_path / "missing")) is None
    for n, complete in ((2, True), (10, True), (12, False)):
        d = tmp_path / f"checkpoint-{n}"
        d.mkdir()
        if complete:
            (d / "trainer_state.json").write_text("{}")
    (tmp_path / "tmp-checkpoint-14").mkdir()
    (tmp_path / "checkpoint-final").mkdir()  # not a checkpoint-N: left alone
    assert last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-10")  # numeric, not lexical
    removed = clean_incomplete_checkpoints(str(tmp_path))
    assert sorted(Path(p).name for p in removed) == ["checkpoint-12", "tmp-checkpoint-14"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-2", "checkpoint-final"]
    # committing over an existing checkpoint of the same step replaces it whole
    final = tmp_path / "checkpoint-10"
    staged = Path(staging_dir(str(final)))
    staged.mkdir()
    (staged / "trainer_state.json").write_text('{"new": 1}')
    commit_staged(str(staged), str(final))
    assert json.loads((final / "trainer_state.json").read_text()) == {"new": 1}
    assert not staged.exists() and not list(tmp_path.glob("tmp-*"))
