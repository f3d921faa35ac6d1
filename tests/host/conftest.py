"""Shared launches of the real CLIs on the tiny assets: each run is made once per session."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.host import runs


@pytest.fixture(scope="session")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("host")


@pytest.fixture(scope="session")
def initial_projector(tiny_assets, work) -> Path:
    """A fixed mlp2x_gelu projector, so that two code bases start from the same weights."""
    import json

    mm_hidden = json.loads((tiny_assets.vision_dir / "config.json").read_text())["hidden_size"]
    hidden = json.loads((tiny_assets.llm_dir / "config.json").read_text())["hidden_size"]
    g = torch.Generator().manual_seed(123)
    shapes = {"0": (hidden, mm_hidden), "2": (hidden, hidden)}
    state = {}
    for idx, (out_f, in_f) in shapes.items():
        state[f"model.mm_projector.{idx}.weight"] = torch.randn(out_f, in_f, generator=g) / in_f ** 0.5
        state[f"model.mm_projector.{idx}.bias"] = torch.zeros(out_f)
    path = work / "initial_mm_projector.bin"
    torch.save(state, path)
    return path


@pytest.fixture(scope="session")
def joint_run(tiny_assets, work) -> Path:
    """Our entry, 1 process, default contrastive settings, seeded projector init (no file)."""
    out = work / "joint"
    runs.run("llava_contrastive.train", runs.stage1_args(tiny_assets, out, steps=16), log=work / "joint.log")
    return out


@pytest.fixture(scope="session")
def upstream_run(tiny_assets, work, initial_projector) -> Path:
    out = work / "upstream"
    args = runs.stage1_args(tiny_assets, out, steps=8, extra=["--pretrain_mm_mlp_adapter", str(initial_projector)])
    runs.run("llava.train.train", args, log=work / "upstream.log")
    return out


@pytest.fixture(scope="session")
def weight0_run(tiny_assets, work, initial_projector) -> Path:
    out = work / "weight0"
    args = runs.stage1_args(tiny_assets, out, steps=8, extra=[
        "--pretrain_mm_mlp_adapter", str(initial_projector), "--contrastive_weight", "0",
        "--vision_tower_dtype", "float16"])  # upstream's exact numerics (fp16 tower) on CPU
    runs.run("llava_contrastive.train", args, log=work / "weight0.log")
    return out


# ---- stage 2 through our entry (tests/host/test_upstream_loader.py, test_vqa.py) --------------
# Directory names follow upstream's ("llava" in them, "lora" for LoRA) because upstream's loader
# chooses its path from the name.
@pytest.fixture(scope="session")
def stage1_dir(tiny_assets, work) -> Path:
    out = work / "llava-tiny-pretrain"
    runs.run("llava_contrastive.train", runs.stage1_args(tiny_assets, out, steps=8), log=work / "stage1.log")
    return out


@pytest.fixture(scope="session")
def stage2_lora_dir(tiny_assets, work, stage1_dir) -> Path:
    out = work / "llava-tiny-lora"
    runs.run("llava_contrastive.train", runs.stage2_args(tiny_assets, out, stage1_dir / "mm_projector.bin", lora=True),
             log=work / "stage2_lora.log")
    return out


@pytest.fixture(scope="session")
def stage2_full_dir(tiny_assets, work, stage1_dir) -> Path:
    out = work / "llava-tiny-full"
    runs.run("llava_contrastive.train", runs.stage2_args(tiny_assets, out, stage1_dir / "mm_projector.bin", lora=False),
             log=work / "stage2_full.log")
    return out
