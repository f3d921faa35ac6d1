"""Pre-flight in the native host's entry (`python -m llava_contrastive.hosts.hf.train`, stack M): a missing
--vision_dir and a resume into a run with other settings end with exit code 2 before any model loads."""
from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from llava_contrastive.training import preflight as pf

REPO = Path(__file__).resolve().parents[2]
ENTRY = "llava_contrastive.hosts.hf.train"
AFTER_MODEL_LOAD = ("Loading weights", "data check (")


def train_args(tiny_assets, out, *extra):
    return ["--llm_dir", str(tiny_assets.llm_dir), "--vision_dir", str(tiny_assets.vision_dir),
            "--data_path", str(tiny_assets.pretrain_json), "--image_folder", str(tiny_assets.image_folder),
            "--output_dir", str(out), "--per_device_train_batch_size", "4", "--max_steps", "2",
            "--save_strategy", "steps", "--save_steps", "2", "--report_to", "none",
            "--dataloader_num_workers", "0", "--disable_tqdm", "true", "--seed", "0", *extra]


def launch(args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="",
               TOKENIZERS_PARALLELISM="false")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", ENTRY, *args], cwd=str(REPO), env=env, capture_output=True, text=True,
                          timeout=600)
    return proc, time.monotonic() - start


def assert_refused_before_load(proc, seconds, *expected):
    err = proc.stderr
    assert proc.returncode == 2, err[-4000:]
    assert "Traceback" not in err
    for text in expected:
        assert text in err, err[-4000:]
    assert pf.READY_MARKER not in err and not [s for s in AFTER_MODEL_LOAD if s in err], err[-4000:]
    print(f"\nrefused in {seconds:.1f} s:\n{err.strip()}")


def test_default_table_matches_the_native_host_argument_classes():
    import transformers

    from llava_contrastive.hosts.hf.train import DataArguments, ModelArguments

    real = {f.name: f.default for cls in (ModelArguments, DataArguments, transformers.TrainingArguments)
            for f in dataclasses.fields(cls)}
    for name, default in pf.HOST_DEFAULTS["hf"].items():
        if name == "overwrite_output_dir":
            assert name not in real  # gone in transformers 5: the entry strips it after pre-flight acts on it
            continue
        if name == "output_dir":
            continue
        assert real[name] == default, name


def test_missing_vision_dir_refused_before_load(tiny_assets, tmp_path):
    out = tmp_path / "out"
    proc, seconds = launch(train_args(tiny_assets, out, "--vision_dir", "/nonexistent/clip-vit-tiny"))
    assert_refused_before_load(proc, seconds, "error: --vision_dir /nonexistent/clip-vit-tiny: path not found")
    assert not out.exists()


def test_resume_with_other_settings_refused_before_load(tiny_assets, tmp_path, monkeypatch):
    out = tmp_path / "out"
    # a run started with the default settings: the entry's own pre-flight wrote run_settings.json, and a
    # checkpoint exists (the trainer's own checkpoint writing is covered by test_resume.py)
    monkeypatch.chdir(REPO)
    pf.run_preflight(train_args(tiny_assets, out), "hf", stream=io.StringIO())
    (out / "checkpoint-2").mkdir()
    proc, seconds = launch(train_args(tiny_assets, out, "--contrastive_loss", "siglip"))
    assert_refused_before_load(proc, seconds, "holds checkpoints of a run with other settings",
                               "--contrastive_loss 'infonce' -> 'siglip'", "--overwrite_output_dir True")
    assert json.loads((out / pf.RUN_SETTINGS_FILE).read_text())["compared"]["contrastive_loss"] == "infonce"


_NO_TORCH_PROBE = '''
import runpy, sys
sys.argv = ["train", *sys.argv[1:]]
try:
    if sys.argv_entry == "module":
        runpy.run_module("llava_contrastive.hosts.hf.train", run_name="__main__", alter_sys=True)
    else:
        from llava_contrastive.cli import main
        sys.exit(main(["train", "--host", "hf", *sys.argv[1:]]))
except SystemExit as e:
    print("exit", e.code, "torch" in sys.modules, "transformers" in sys.modules)
'''


def test_user_error_exits_before_torch_or_transformers_import(tmp_path):
    """`python -m ...hosts.hf.train` and `llava-contrastive train --host hf`: the refusal comes before
    the entry module's own imports (seconds of torch + transformers on a cluster file system)."""
    bad = ["--llm_dir", str(tmp_path / "no-llm"), "--vision_dir", str(tmp_path / "no-tower"), "--data_path",
           str(tmp_path / "no.json"), "--image_folder", str(tmp_path), "--output_dir", str(tmp_path / "o")]
    for entry in ("module", "cli"):
        code = _NO_TORCH_PROBE.replace("sys.argv_entry", repr(entry))
        proc = subprocess.run([sys.executable, "-c", code, *bad], capture_output=True, text=True, timeout=120,
                              cwd=str(REPO), env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO)))
        assert proc.stdout.strip() == "exit 2 False False", (entry, proc.stdout, proc.stderr[-2000:])
        assert "--llm_dir" in proc.stderr and "path not found" in proc.stderr
