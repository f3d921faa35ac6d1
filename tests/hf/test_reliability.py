"""Reliability of the native host's stage 1 (``python -m llava_contrastive.hosts.hf.train``): the
upstream host's guarantees through the same core code (data_check.py, data_guard.py, nonfinite.py).

a. --data_check_policy error: a corpus with a missing image, a truncated JPEG and a malformed record
   stops before step 1 (exit 1) naming them and the fix; nothing trained, no checkpoint
b. --data_check_policy skip: trains on exactly the good records, writes skipped_records.json
c. a file deleted mid-training (after the check): skip replaces and counts it; error stops at that
   step after a resumable checkpoint naming the record, and the same command resumes once it is back
d. a NaN at step k (LLAVA_CONTRASTIVE_FAULTS=nonfinite_loss@k): stops with step and values, the last
   checkpoint intact (the same command without the fault resumes from it); --nonfinite_max_skips 1
   skips that step and finishes
e. 2 ranks (torchrun, gloo, CPU): (c) under error: both ranks stop at the same step after one
   checkpoint written by both, no hang

A file "deleted mid-training" is deleted by a small driver (``VANISH``) around the real entry: a
callback arms it at the end of optimizer step k, and the next sample the dataset loads on rank 0 has
its image renamed away just before it is opened (once: a marker file records the victim).
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from corpus_helpers import noise_jpeg, record, write_corpus
from host.runs import free_port

REPO = Path(__file__).resolve().parents[2]
ENTRY = "llava_contrastive.hosts.hf.train"
N_GOOD = 12
BATCH = 4

DRIVER = '''
import json, os, sys
from transformers import TrainerCallback
from llava_contrastive.hosts.hf import data, train

at, marker = int(os.environ["VANISH_AT"]), os.environ["VANISH_MARKER"]
armed = [False]

class Arm(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == at:
            armed[0] = True

get = data.PretrainDataset.__getitem__

def getitem(self, i):
    if armed[0] and os.environ.get("RANK", "0") == "0" and not os.path.exists(marker):
        armed[0] = False
        path = os.path.join(self.image_folder, self.records[i]["image"])
        os.rename(path, path + ".gone")
        with open(marker, "w") as f:
            json.dump({"id": self.records[i]["id"], "path": path}, f)
    return get(self, i)

data.PretrainDataset.__getitem__ = getitem
init = train.ContrastiveHFTrainer.__init__

def init_with_arm(self, *a, **kw):
    init(self, *a, **kw)
    self.add_callback(Arm())

train.ContrastiveHFTrainer.__init__ = init_with_arm
sys.exit(train.main())
'''


# ---- helpers ------------------------------------------------------------------------------------


def args_for(native_dir, data, folder, out, *extra, steps=None):
    length = ["--max_steps", str(steps)] if steps else ["--num_train_epochs", "1"]
    return ["--model_name_or_path", str(native_dir), "--data_path", str(data), "--image_folder", str(folder),
            "--output_dir", str(out), "--per_device_train_batch_size", str(BATCH), "--learning_rate", "2e-3",
            "--logging_steps", "1", "--report_to", "none", "--dataloader_num_workers", "0", "--disable_tqdm", "true",
            "--seed", "0", "--contrastive_weight", "0.5",
            "--data_check_cache", str(Path(out).parent / "check-cache.json"), *length, *extra]


def run(args, *, nproc=1, vanish=None, log=None, timeout=300, **extra_env):
    """The entry (or the VANISH driver around it) as a subprocess; ``vanish`` = (step, marker file)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", LLAVA_CONTRASTIVE_QUIET="1",
               PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1")
    env.pop("LLAVA_CONTRASTIVE_FAULTS", None)
    env.update(extra_env)
    if vanish is not None:
        env.update(VANISH_AT=str(vanish[0]), VANISH_MARKER=str(vanish[1]))
        target = ["-c", DRIVER] if nproc == 1 else [str(vanish[1]) + ".driver.py"]
        if nproc > 1:
            Path(target[0]).write_text(DRIVER)
    else:
        target = ["-m", ENTRY]
    if nproc == 1:
        cmd = [sys.executable, *target, *args]
    else:
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                  "--master_port", str(free_port())]
        cmd = launch + (target if vanish is not None else ["-m", ENTRY]) + list(args)
    proc = subprocess.run(cmd, cwd=str(REPO), env=env, capture_output=True, text=True, timeout=timeout)
    if log is not None:
        Path(log).write_text(" ".join(cmd) + "\n" + proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    return proc


def train_logs(out: Path):
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [h for h in history if "loss" in h and "step" in h]


def checkpoints(out: Path):
    return sorted((p for p in out.glob("checkpoint-*")), key=lambda p: int(p.name.split("-")[1]))


def assert_complete_checkpoint(ck: Path, step: int, ranks: int = 1, deepspeed: bool = False):
    state = json.loads((ck / "trainer_state.json").read_text())
    assert state["global_step"] == step
    names = {p.name for p in ck.iterdir()}
    rng = {"rng_state.pth"} if ranks == 1 else {f"rng_state_{r}.pth" for r in range(ranks)}
    optimizer = {f"global_step{step}", "latest"} if deepspeed else {"optimizer.pt"}  # the engine's, or torch's
    assert {"mm_projector.bin", "contrastive_head.safetensors", "scheduler.pt"} | rng | optimizer <= names, names
    if deepspeed:
        assert len(list((ck / f"global_step{step}").glob("*optim_states.pt"))) == ranks
    proj = torch.load(ck / "mm_projector.bin", weights_only=True)
    assert all(torch.isfinite(v).all() for v in proj.values())


def good_corpus(root: Path, assets, n: int):
    """``n`` records of the tiny corpus with their images copied (so tests can delete them)."""
    folder = root / "images"
    records = json.loads(Path(assets.pretrain_json).read_text())[:n]
    for r in records:
        (folder / r["image"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(assets.image_folder) / r["image"], folder / r["image"])
    return records, folder


def bad_corpus(root: Path, assets):
    """(data json, image folder, {bad id: reason}): N_GOOD good records and a missing image, a
    truncated JPEG and a malformed record, interleaved."""
    records, folder = good_corpus(root, assets, N_GOOD)
    jpeg = noise_jpeg()
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    img = records[0]["image"]
    bad = {
        "missing": (record("missing", "00000/does-not-exist.jpg"), "missing_image"),
        "truncated": (record("truncated", "truncated.jpg"), "truncated_image"),
        "malformed": ({"id": "malformed", "image": img, "conversations": [{"from": "human", "value": "<image>"}]},
                      "malformed_record"),
    }
    data = root / "data.json"
    return data, folder, write_corpus(data, records, bad, every=3)


@pytest.fixture(scope="module")
def corpus(tiny_assets, tmp_path_factory):
    return bad_corpus(tmp_path_factory.mktemp("bad_corpus"), tiny_assets)


# ---- the shared core pieces, in process (fast) -------------------------------------------------------
def test_core_modules_import_neither_transformers_nor_llava():
    import ast

    def imported(source: str) -> set:
        tree = ast.parse(source)
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level}
        return {m.split(".")[0] for m in names}

    for name in ("data/guard", "training/step_guard"):
        assert not imported((REPO / "llava_contrastive" / f"{name}.py").read_text()) & {"transformers", "llava"}
    # data/check.py (used by both): transformers only inside its stand-alone CLI's main()
    check = (REPO / "llava_contrastive" / "data" / "check.py").read_text().split("\ndef main(")[0]
    assert not imported(check) & {"transformers", "llava"}


def test_guarded_native_dataset_names_flags_and_replaces_a_vanished_record(tiny_assets, native_dir, tmp_path):
    from transformers import AutoProcessor

    from llava_contrastive.data.guard import BAD_RECORDS_KEY, FlaggingCollator, GuardedDataset
    from llava_contrastive.hosts.hf.data import Collator, PretrainDataset

    records, folder = good_corpus(tmp_path, tiny_assets, 4)
    processor = AutoProcessor.from_pretrained(str(native_dir))
    plain = PretrainDataset(None, folder, processor, image_seq_length=16, records=records)
    strict = GuardedDataset(plain, "error")
    lenient = GuardedDataset(plain, "skip", log_path=str(tmp_path / "runtime.jsonl"))
    assert strict.records is records and len(strict) == 4
    victim = folder / records[1]["image"]
    victim.unlink()
    item = strict[1]  # the next record stands in, flagged with the one that failed
    assert item["input_ids"].tolist() == plain[2]["input_ids"].tolist()
    flag = item["_bad_record"]
    assert f"id={records[1]['id']!r}" in flag and str(victim) in flag and "missing_image" in flag
    batch = FlaggingCollator(Collator(processor.tokenizer.pad_token_id))([strict[0], item])
    assert batch[BAD_RECORDS_KEY] == [flag] and batch["pixel_values"].shape[0] == 2
    assert lenient[1]["input_ids"].tolist() == plain[2]["input_ids"].tolist() and lenient.runtime_skips == 1
    logged = json.loads((tmp_path / "runtime.jsonl").read_text())
    assert logged["id"] == records[1]["id"] and logged["reason"] == "missing_image"
    assert strict.runtime_skips == 0  # policy error never replaces silently


def test_nonfinite_guard_agrees_counts_and_stops():
    from llava_contrastive.data.check import DataCheckError
    from llava_contrastive.training.step_guard import (NonFiniteGuard, NonFiniteLossError, agree_on_step, raise_bad_records,
                                             zero_loss)

    finite = agree_on_step(torch.tensor(1.5), torch.tensor(14.3), 0, torch.tensor(4.0))
    assert not finite.nonfinite and not finite.bad_records and finite.global_rows == 4.0 and not finite.distributed
    assert agree_on_step(torch.tensor(1.5), torch.tensor(float("inf"))).nonfinite  # the logit scale counts too
    nan = agree_on_step(torch.tensor(float("nan")))
    guard = NonFiniteGuard(max_skips=1)
    assert guard.check(finite, 1, {"loss": torch.tensor(1.5)}, "out") is False
    assert guard.check(nan, 3, {"loss": torch.tensor(float("nan"))}, "out") is True and guard.count == 1
    with pytest.raises(NonFiniteLossError, match=r"step 7 .*loss=nan.*--nonfinite_max_skips 1.*out is intact"):
        guard.check(nan, 7, {"loss": torch.tensor(float("nan")), "logit_scale": None}, "out")
    p = torch.nn.Parameter(torch.ones(3))
    frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    zero_loss([p, frozen]).backward()
    assert torch.equal(p.grad, torch.zeros(3)) and frozen.grad is None
    bad = agree_on_step(torch.tensor(1.0), n_bad_records=1)
    with pytest.raises(DataCheckError, match="unreadable at optimizer step 5: record #3") as err:
        raise_bad_records(bad, 5, ["record #3 id='x'"])
    assert err.value.agreed
    raise_bad_records(finite, 5, [])  # nothing bad: no error


# ---- a, b: the pre-flight check -------------------------------------------------------------------
@pytest.mark.slow
def test_policy_error_stops_before_step_1_naming_records_and_fix(native_dir, corpus, tmp_path):
    data, folder, bad = corpus
    out = tmp_path / "error"
    proc = run(args_for(native_dir, data, folder, out, "--data_check", "full", "--data_check_policy", "error",
                        "--save_strategy", "steps", "--save_steps", "1"), log=tmp_path / "error.log")
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    for rid, reason in bad.items():
        assert any(f"id={rid!r}" in line and reason in line for line in lines), (rid, reason)
    assert "3 of 15 records are bad" in proc.stderr and "--data_check_policy skip" in proc.stderr  # the fix
    assert "DataCheckError" in proc.stderr and "Traceback" not in proc.stderr
    report = json.loads((out / "data_check_report.json").read_text())
    assert report["n_bad"] == 3 and report["n_good"] == N_GOOD and report["policy"] == "error"
    assert {b["id"]: b["reason"] for b in report["bad"]} == bad
    assert not checkpoints(out) and not list(out.glob("tmp-*"))
    assert not (out / "trainer_state.json").exists() and not (out / "mm_projector.bin").exists()
    assert not (out / "skipped_records.json").exists()


@pytest.mark.slow
def test_policy_skip_trains_on_exactly_the_good_records(native_dir, corpus, tmp_path):
    data, folder, bad = corpus
    out = tmp_path / "skip"
    proc = run(args_for(native_dir, data, folder, out, "--data_check", "full", "--data_check_policy", "skip"),
               log=tmp_path / "skip.log")
    assert proc.returncode == 0, proc.stderr[-3000:]
    skipped = json.loads((out / "skipped_records.json").read_text())
    assert {s["id"]: s["reason"] for s in skipped} == bad
    report = json.loads((out / "data_check_report.json").read_text())
    assert report["n_good"] == N_GOOD and report["n_bad"] == len(bad) and report["policy"] == "skip"
    state = json.loads((out / "trainer_state.json").read_text())
    steps = math.ceil(N_GOOD / BATCH)  # 3 steps of 4 = the 12 good records; all 15 would take 4
    assert state["max_steps"] == state["global_step"] == steps and len(train_logs(out)) == steps
    assert state["log_history"][-1]["epoch"] == pytest.approx(1.0)
    assert not (out / "runtime_skipped_records.jsonl").exists()
    assert (out / "mm_projector.bin").is_file()


# ---- c: a file deleted mid-training ---------------------------------------------------------------
@pytest.mark.slow
def test_file_deleted_mid_training_is_replaced_and_counted_under_skip(tiny_assets, native_dir, tmp_path):
    records, folder = good_corpus(tmp_path / "corpus", tiny_assets, 32)
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    out, marker = tmp_path / "skip", tmp_path / "vanished.json"
    proc = run(args_for(native_dir, data, folder, out, "--data_check", "quick", "--data_check_policy", "skip",
                        steps=6), vanish=(2, marker), log=tmp_path / "vanish_skip.log")
    assert proc.returncode == 0, proc.stderr[-3000:]
    victim = json.loads(marker.read_text())
    assert json.loads((out / "data_check_report.json").read_text())["n_bad"] == 0  # the check saw it
    lines = (out / "runtime_skipped_records.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["id"] == victim["id"]
    assert json.loads(lines[0])["reason"] == "missing_image"
    assert "failed to load during training" in proc.stderr and victim["path"] in proc.stderr
    logs = train_logs(out)
    assert [h["step"] for h in logs] == list(range(1, 7))
    counted = [h.get("runtime_skipped_records", 0) for h in logs]
    assert counted[-1] == 1 and counted[:2] == [0, 0]  # deleted after step 2, counted from then on
    assert json.loads((out / "skipped_records.json").read_text()) == []


@pytest.mark.slow
def test_file_deleted_mid_training_stops_with_a_checkpoint_under_error_then_resumes(tiny_assets, native_dir,
                                                                                     tmp_path):
    records, folder = good_corpus(tmp_path / "corpus", tiny_assets, 32)
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    out, marker = tmp_path / "error", tmp_path / "vanished.json"
    args = args_for(native_dir, data, folder, out, "--data_check", "quick", "--data_check_policy", "error",
                    "--save_strategy", "steps", "--save_steps", "100", steps=6)
    proc = run(args, vanish=(2, marker), log=tmp_path / "vanish_error.log")
    assert proc.returncode == 1, proc.stderr[-3000:]
    victim = json.loads(marker.read_text())
    msg = [line for line in proc.stderr.splitlines() if "became unreadable at optimizer step" in line]
    assert len(msg) == 1 and f"id={victim['id']!r}" in msg[0] and victim["path"] in msg[0]
    assert "missing_image" in msg[0] and "--data_check_policy skip" in msg[0] and "re-run the command" in msg[0]
    stopped = int(msg[0].split("at optimizer step ")[1].split(":")[0])
    assert stopped > 2
    (ck,) = checkpoints(out)  # save_steps 100: only the one saved before stopping
    assert ck.name == f"checkpoint-{stopped - 1}"
    assert_complete_checkpoint(ck, stopped - 1)
    assert not (out / "mm_projector.bin").exists() and not list(out.glob("tmp-*"))

    os.rename(victim["path"] + ".gone", victim["path"])  # the file is back: the same command resumes
    done = run(args, vanish=(2, marker), log=tmp_path / "vanish_resume.log")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from {ck}" in done.stderr
    assert [h["step"] for h in train_logs(out)] == list(range(1, 7))
    assert (out / "mm_projector.bin").is_file()


# ---- d: non-finite loss ----------------------------------------------------------------------------
@pytest.mark.slow
def test_nan_at_step_k_stops_with_step_and_values_and_keeps_the_checkpoint(tiny_assets, native_dir, tmp_path):
    records, folder = good_corpus(tmp_path / "corpus", tiny_assets, 24)
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "nan"
    args = args_for(native_dir, data, folder, out, "--save_strategy", "steps", "--save_steps", "2", steps=5)
    proc = run(args, log=tmp_path / "nan.log", LLAVA_CONTRASTIVE_FAULTS="nonfinite_loss@3")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "NonFiniteLossError: non-finite loss at optimizer step 3" in proc.stderr
    assert "loss=nan" in proc.stderr and "logit_scale=" in proc.stderr and "is intact" in proc.stderr
    assert [p.name for p in checkpoints(out)] == ["checkpoint-2"] and not list(out.glob("tmp-*"))
    assert_complete_checkpoint(out / "checkpoint-2", 2)
    assert not (out / "mm_projector.bin").exists()

    resumed = run(args, log=tmp_path / "nan_resume.log")  # the same command, no fault: resumes from it
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {out / 'checkpoint-2'}" in resumed.stderr
    assert [h["step"] for h in train_logs(out)] == [1, 2, 3, 4, 5]

    skipped = tmp_path / "nan_skip"
    proc = run(args_for(native_dir, data, folder, skipped, "--nonfinite_max_skips", "1", steps=5),
               log=tmp_path / "nan_skip.log", LLAVA_CONTRASTIVE_FAULTS="nonfinite_loss@3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "non-finite loss at step 3" in proc.stderr and "[1/1]" in proc.stderr
    logs = train_logs(skipped)
    assert [h["step"] for h in logs] == [1, 2, 3, 4, 5]
    assert all(math.isfinite(h["loss"]) and math.isfinite(h["ntp_loss"]) for h in logs)
    assert [h.get("nonfinite_skipped_total", 0) for h in logs] == [0, 0, 1, 1, 1]
    proj = torch.load(skipped / "mm_projector.bin", weights_only=True)
    assert all(torch.isfinite(v).all() for v in proj.values())


# ---- e: 2 ranks ------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_stop_together_at_the_step_with_one_checkpoint(tiny_assets, native_dir, tmp_path):
    """(c) under error on 2 ranks with the repository's ZeRO-2 config (the host's multi-rank recipe; plain
    DDP, without --deepspeed, behaves the same): rank 0 meets the vanished file, rank 1 learns it from the
    step's all-reduce; both save their part of one checkpoint, print the error and exit."""
    records, folder = good_corpus(tmp_path / "corpus", tiny_assets, 48)
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    out, marker = tmp_path / "error2", tmp_path / "vanished.json"
    args = args_for(native_dir, data, folder, out, "--data_check", "quick", "--data_check_policy", "error",
                    "--save_strategy", "steps", "--save_steps", "100", "--use_cpu", "true",
                    "--deepspeed", str(REPO / "scripts" / "zero2.json"), steps=6)
    proc = run(args, nproc=2, vanish=(2, marker), log=tmp_path / "error2.log", timeout=180)
    assert proc.returncode != 0
    victim = json.loads(marker.read_text())
    found = re.findall(r"\[rank (\d)\] DataCheckError: a training record became unreadable at optimizer step "
                       r"(\d+): (.*?)\. --data_check_policy error stops here", proc.stderr)
    where = {int(rank): (int(step), text) for rank, step, text in found}
    assert len(found) == 2 and set(where) == {0, 1}, proc.stderr[-3000:]  # every rank says so
    assert f"id={victim['id']!r}" in where[0][1] and where[1][1] == "on another rank (see its log)"
    assert where[0][0] == where[1][0]  # at the same step
    stopped = where[0][0]
    (ck,) = checkpoints(out)
    assert ck.name == f"checkpoint-{stopped - 1}"
    assert_complete_checkpoint(ck, stopped - 1, ranks=2, deepspeed=True)
    assert not (out / "mm_projector.bin").exists() and not list(out.glob("tmp-*"))
    report = json.loads((out / "data_check_report.json").read_text())
    assert report["n_records"] == 48 and report["n_bad"] == 0
