"""Pre-flight through the real entry (`python -m llava_contrastive.train`, subprocesses) on the tiny assets,
with the flags of scripts/pretrain_contrastive.sh: each user mistake of issue 17 ends with exit code 2,
one message naming the flag and the fix, no traceback, before any model loads.

"Before any model loads": pre-flight prints READY_MARKER when it passes, right before the model is
built; a refused run never prints it, nor any line that the model load, the data check (after the
model in upstream's train()) or the trainer print, and writes nothing into --output_dir.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from llava_contrastive.training.preflight import READY_MARKER, RUN_SETTINGS_FILE
from tests.host import runs

ENTRY = "llava_contrastive.train"
# printed once the model exists: transformers' config warning at from_pretrained, the data check, the trainer
AFTER_MODEL_LOAD = ("to instantiate a model of type", "data check (", "contrastive: infonce")


def launch(tiny_assets, out: Path, *extra: str, steps: int = 2):
    args = runs.stage1_args(tiny_assets, out, steps=steps, extra=["--save_steps", "2", *extra])
    start = time.monotonic()
    proc = runs.run(ENTRY, args, check=False, timeout=600)
    return proc, time.monotonic() - start


def assert_refused_before_load(proc, seconds, out: Path, *expected: str) -> str:
    err = proc.stderr
    assert proc.returncode == 2, err[-4000:]
    assert "Traceback" not in err, err[-4000:]
    for text in expected:
        assert text in err, err[-4000:]
    assert READY_MARKER not in err
    assert not [s for s in AFTER_MODEL_LOAD if s in err], err[-4000:]
    print(f"\nrefused in {seconds:.1f} s:\n{err.strip()}")
    return err


@pytest.mark.parametrize("case,extra,expected", [
    ("version_v1", ["--version", "v1"],
     ["error: --version v1 with --contrastive_weight 0.5: the contrastive term needs caption-only labels",
      "Fix: pass --version plain"]),
    ("start_end", ["--mm_use_im_start_end", "True"],
     ["error: --mm_use_im_start_end True with --contrastive_weight 0.5", "--mm_use_im_start_end False"]),
    ("missing_data", ["--data_path", "/nonexistent/blip_laion_cc_sbu_558k.json"],
     ["error: --data_path /nonexistent/blip_laion_cc_sbu_558k.json does not exist"]),
    ("missing_tower", ["--vision_tower", "/nonexistent/clip-vit-large-patch14-336"],
     ["error: --vision_tower /nonexistent/clip-vit-large-patch14-336: path not found"]),
])
def test_user_error_refused_before_model_load(tiny_assets, tmp_path, case, extra, expected):
    out = tmp_path / case
    proc, seconds = launch(tiny_assets, out, *extra)
    assert_refused_before_load(proc, seconds, out, *expected)
    assert not out.exists()  # nothing written, nothing trained


def test_wrong_image_folder_blames_the_folder(tiny_assets, tmp_path):
    out = tmp_path / "folder"
    wrong = tiny_assets.data_root  # exists, but the records' paths are relative to LLaVA-Pretrain/images
    proc, seconds = launch(tiny_assets, out, "--image_folder", str(wrong))
    first = json.loads(tiny_assets.pretrain_json.read_text())[0]["image"]
    err = assert_refused_before_load(
        proc, seconds, out, f"every image missing: check --image_folder, first missing path is {wrong / first}")
    assert "records are bad" not in err  # not the data check's per-record verdict ...
    assert "pass --data_check_policy skip to" not in err  # ... nor its advice


def test_inert_prompt_warns_and_the_run_proceeds(tiny_assets, tmp_path):
    out = tmp_path / "prompt"
    proc, _ = launch(tiny_assets, out, "--contrastive_prompt", "e5v")
    err = proc.stderr
    assert proc.returncode == 0, err[-4000:]
    warning = ("warning: --contrastive_prompt is unused with --contrastive_text_source input_embeds")
    assert warning in err and "Traceback" not in err
    # printed by pre-flight, before the model was loaded and trained
    assert err.index(warning) < err.index(READY_MARKER) < err.index("to instantiate a model of type")
    assert (out / "mm_projector.bin").is_file()


def test_mixed_run_refused_and_same_command_resumes(tiny_assets, tmp_path):
    out = tmp_path / "resume"
    first, _ = launch(tiny_assets, out, steps=2)
    assert first.returncode == 0, first.stderr[-4000:]
    assert (out / "checkpoint-2").is_dir() and (out / RUN_SETTINGS_FILE).is_file()
    state_before = (out / "checkpoint-2" / "trainer_state.json").read_text()

    mixed, seconds = launch(tiny_assets, out, "--contrastive_weight", "2.0", steps=4)
    assert_refused_before_load(mixed, seconds, out,
                               "holds checkpoints of a run with other settings", "--contrastive_weight 0.5 -> 2.0",
                               "--overwrite_output_dir True")
    assert (out / "checkpoint-2" / "trainer_state.json").read_text() == state_before  # untouched
    assert json.loads((out / RUN_SETTINGS_FILE).read_text())["compared"]["contrastive_weight"] == 0.5

    same, _ = launch(tiny_assets, out, steps=4)  # the same command, extended: resumes silently
    assert same.returncode == 0, same.stderr[-4000:]
    assert "error:" not in same.stderr and "warning: " not in same.stderr.split(READY_MARKER)[0]
    assert "resuming stage-1 weights" in same.stderr and "checkpoint-2" in same.stderr
    steps = [h["step"] for h in runs.train_logs(out)]
    assert steps == [1, 2, 3, 4]  # one run in trainer_state.json, continued from step 2


def test_overwrite_output_dir_starts_over(tiny_assets, tmp_path):
    out = tmp_path / "overwrite"
    first, _ = launch(tiny_assets, out, steps=2)
    assert first.returncode == 0, first.stderr[-4000:]
    again, _ = launch(tiny_assets, out, "--contrastive_weight", "2.0", "--overwrite_output_dir", "True", steps=2)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "resuming" not in again.stderr and "removed" in again.stderr
    logs = runs.train_logs(out)
    assert [h["step"] for h in logs] == [1, 2]
    assert json.loads((out / RUN_SETTINGS_FILE).read_text())["compared"]["contrastive_weight"] == 2.0
