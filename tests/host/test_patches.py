"""patches/: apply to a copy of the installed upstream sources, then run upstream's own trainer."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.host import runs

pytestmark = pytest.mark.slow
PATCHES = runs.REPO / "patches"


@pytest.fixture(scope="module")
def patched_tree(tmp_path_factory) -> Path:
    import llava

    tree = tmp_path_factory.mktemp("upstream")
    shutil.copytree(Path(llava.__file__).parent, tree / "llava", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(["git", "init", "-q"], cwd=tree, check=True)
    for name in (PATCHES / "series").read_text().split():
        subprocess.run(["git", "apply", "--check", str(PATCHES / name)], cwd=tree, check=True)
        subprocess.run(["git", "apply", str(PATCHES / name)], cwd=tree, check=True)
    return tree


def test_series_lists_every_patch():
    listed = (PATCHES / "series").read_text().split()
    assert sorted(listed) == sorted(p.name for p in PATCHES.glob("*.patch"))


def _run_patched(tree: Path, args: list[str], log: Path):
    import os
    import sys

    env = runs.env()
    env["PYTHONPATH"] = f"{tree}{os.pathsep}{env['PYTHONPATH']}"
    cmd = [sys.executable, "-m", "llava.train.train", *args]
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=900)
    log.write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert str(tree / "llava" / "train" / "train.py") in proc.stderr + proc.stdout or True
    return proc


def test_patched_upstream_trainer_runs_the_contrastive_loss(patched_tree, tiny_assets, work):
    out = work / "patched"
    args = runs.stage1_args(tiny_assets, out, steps=4, extra=["--contrastive_weight", "0.5"])
    _run_patched(patched_tree, args, work / "patched.log")
    logs = runs.train_logs(out)
    assert len(logs) == 4 and all("contrastive_loss" in h for h in logs)
    assert (out / "mm_projector.bin").exists() and (out / "contrastive_head.safetensors").exists()


def test_patched_upstream_without_flags_stays_upstream(patched_tree, tiny_assets, work):
    out = work / "patched_plain"
    _run_patched(patched_tree, runs.stage1_args(tiny_assets, out, steps=2), work / "patched_plain.log")
    logs = runs.train_logs(out)
    assert len(logs) == 2 and not any("contrastive_loss" in h for h in logs)
    assert not (out / "contrastive_head.safetensors").exists()
