"""Cross-stack: a projector trained by one host gives the same image features in the other.

(a) stack U (upstream `llava`, transformers 4.37) trains a projector with the contrastive term;
    upstream's own code (`hosts/llava/image_features.py`: `initialize_vision_modules(
    pretrain_mm_mlp_adapter=...)`, `process_images`, `encode_images`) computes the image features
    of held-out images; the converted projector in the native `LlavaForConditionalGeneration`
    gives the same features through the native `LlavaProcessor`.
(b) and back: the native host (stack M) trains a projector; upstream's code computes the features
    with its `mm_projector.bin`.
Both sides run in float32 (upstream's trainer would cast the tower to fp16/bf16). Tolerance 1e-5;
the pixel tensors must be identical. Measured values are printed (`-s`) and recorded as properties.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
import torch

from llava_contrastive.hosts.hf import convert

REPO = Path(__file__).resolve().parents[2]
ATOL = 1e-5
N_HELDOUT = 4
RESIZED = [(80, 48), (48, 96), (100, 100), (37, 53)]  # non-square / other sizes: resize + centre crop
STEPS, BATCH = 4, 4


def _env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                LLAVA_CONTRASTIVE_QUIET="1", CUDA_VISIBLE_DEVICES="",
                PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")


def stack_u(python: str, module: str, args: List[str], timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([python, "-m", module, *args], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{module} exit {proc.returncode}\n{proc.stderr[-6000:]}"
    return proc


@pytest.fixture(scope="module")
def images(tiny_assets, tmp_path_factory) -> Tuple[Path, List[str]]:
    """N held-out images (never trained on) plus resized copies of them at other sizes and aspect
    ratios (PNG, so both stacks decode the same pixels), in one folder."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("xs-images")
    records = json.loads(Path(tiny_assets.heldout_json).read_text())[:N_HELDOUT]
    names = [r["image"] for r in records]
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(tiny_assets.image_folder) / name, folder / name)
    for i, (w, h) in enumerate(RESIZED):
        img = Image.open(folder / names[i % len(names)]).convert("RGB").resize((w, h), Image.BILINEAR)
        img.save(folder / f"resized_{w}x{h}.png")
        names.append(f"resized_{w}x{h}.png")
    return folder, names


def upstream_features(python: str, assets, projector: Path, folder: Path, names: List[str], out: Path,
                      aspect: str = "square") -> Dict[str, torch.Tensor]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    stack_u(python, "llava_contrastive.hosts.llava.image_features",
            ["--model_name_or_path", str(assets.llm_dir), "--vision_tower", str(assets.vision_dir),
             "--projector", str(projector), "--image_folder", str(folder), "--images", *names,
             "--out", str(out), "--image_aspect_ratio", aspect, "--dtype", "float32"])
    with safe_open(str(out), "pt") as f:
        assert json.loads(f.metadata()["images"]) == names
    return load_file(str(out))


def native_features(model_dir: Path, folder: Path, names: List[str]) -> Dict[str, Any]:
    """Pixels through the native LlavaProcessor; features from get_image_features and from the
    projector output the model feeds the LLM in a forward pass (hook)."""
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(str(model_dir))
    pil = [Image.open(folder / n).convert("RGB") for n in names]
    inputs = processor(images=pil, text=["<image>\n"] * len(pil), return_tensors="pt")
    fed, tower = [], []

    def hook(module, args, output):
        tower.append(args[0].detach())
        fed.append(output.detach())

    handle = model.model.multi_modal_projector.register_forward_hook(hook)
    try:
        with torch.no_grad():
            feats = model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True).pooler_output
            model(**inputs)
    finally:
        handle.remove()
    return {"pixel_values": inputs["pixel_values"], "image_features": torch.stack(list(feats)),
            "fed": fed[-1].reshape(len(pil), -1, fed[-1].shape[-1]),
            "vision_features": tower[-1].reshape(len(pil), -1, tower[-1].shape[-1]), "model": model}


def compare(up: Dict[str, torch.Tensor], nat: Dict[str, Any], label: str, record) -> Dict[str, float]:
    assert up["pixel_values"].shape == nat["pixel_values"].shape
    assert up["image_features"].shape == nat["image_features"].shape == nat["fed"].shape
    pix = (up["pixel_values"] - nat["pixel_values"]).abs().max().item()
    feat = (up["image_features"] - nat["image_features"]).abs().max().item()
    fed = (up["image_features"] - nat["fed"]).abs().max().item()
    vision = (up["vision_features"] - nat["vision_features"]).abs().max().item()
    scale = up["image_features"].abs().max().item()
    measured = {"pixels": pix, "vision_tower": vision, "features": feat, "fed_to_llm": fed, "feature_scale": scale}
    print(f"\n[{label}] max abs diff: pixels {pix:.3g}, vision tower (select layer, patches) {vision:.3g}, "
          f"get_image_features {feat:.3g}, projector output fed to the LLM {fed:.3g} (features up to {scale:.3g})")
    record(label, json.dumps(measured))
    assert torch.equal(up["pixel_values"], nat["pixel_values"]), f"pixel preprocessing differs: {pix}"
    assert up["image_features"].dtype == nat["image_features"].dtype == torch.float32
    assert feat <= ATOL and fed <= ATOL, measured
    return measured


def same_state(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> bool:
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def trained(before: Dict[str, torch.Tensor], after: Dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(before[k], after[k]) for k in after)


def test_upstream_trained_projector_in_native_model(tiny_assets, stack_u_python, images, tmp_path,
                                                    record_property):
    folder, names = images
    run = tmp_path / "upstream-run"
    stack_u(stack_u_python, "llava_contrastive.train", [
        "--model_name_or_path", str(tiny_assets.llm_dir), "--version", "plain",
        "--data_path", str(tiny_assets.pretrain_json), "--image_folder", str(tiny_assets.image_folder),
        "--vision_tower", str(tiny_assets.vision_dir), "--mm_projector_type", "mlp2x_gelu",
        "--tune_mm_mlp_adapter", "True", "--mm_vision_select_layer", "-2",
        "--mm_use_im_start_end", "False", "--mm_use_im_patch_token", "False",
        "--output_dir", str(run), "--max_steps", str(STEPS), "--per_device_train_batch_size", str(BATCH),
        "--learning_rate", "1e-3", "--weight_decay", "0.", "--lr_scheduler_type", "cosine",
        "--logging_steps", "1", "--save_strategy", "no", "--model_max_length", "96",
        "--dataloader_num_workers", "0", "--lazy_preprocess", "True", "--report_to", "none", "--seed", "7",
        "--contrastive_weight", "0.5"])
    logs = [h for h in json.loads((run / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert len(logs) == STEPS and all("contrastive_loss" in h for h in logs)
    up_bin = run / "mm_projector.bin"
    up_state = torch.load(up_bin, weights_only=True)
    assert sorted(up_state) == sorted(f"model.mm_projector.{i}.{p}" for i in (0, 2) for p in ("weight", "bias"))

    up = upstream_features(stack_u_python, tiny_assets, up_bin, folder, names, tmp_path / "upstream.safetensors")
    assert up["image_features"].shape == (len(names), 16, 64)

    # convert: CLI `to-native`, and `build --projector` -> a native checkpoint loaded with from_pretrained
    native_file = tmp_path / "projector.safetensors"
    assert convert.main(["to-native", str(up_bin), str(native_file)]) == 0
    native_dir = tmp_path / "native"
    assert convert.main(["build", "--llm", str(tiny_assets.llm_dir), "--vision", str(tiny_assets.vision_dir),
                         "--out", str(native_dir), "--projector", str(up_bin)]) == 0
    nat = native_features(native_dir, folder, names)
    loaded = convert.projector_state(nat["model"], upstream=False)
    assert same_state(convert.load_state(native_file), loaded)
    # the projector really was trained (not the fresh init of the build)
    fresh, _ = convert.build_native_llava(tiny_assets.llm_dir, tiny_assets.vision_dir)
    assert trained(convert.projector_state(fresh, upstream=False), loaded)

    compare(up, nat, "upstream->native", record_property)

    # upstream -> native -> upstream is bit-exact
    back = tmp_path / "back.bin"
    assert convert.main(["to-upstream", str(native_file), str(back)]) == 0
    assert same_state(torch.load(back, weights_only=True), up_state)


def test_native_trained_projector_in_upstream_model(tiny_assets, stack_u_python, images, tmp_path,
                                                    record_property):
    from llava_contrastive.hosts.hf import train

    folder, names = images
    run = tmp_path / "native-run"
    trainer = train.run([
        "--llm_dir", str(tiny_assets.llm_dir), "--vision_dir", str(tiny_assets.vision_dir),
        "--data_path", str(tiny_assets.pretrain_json), "--image_folder", str(tiny_assets.image_folder),
        "--output_dir", str(run), "--per_device_train_batch_size", str(BATCH), "--learning_rate", "2e-3",
        "--max_steps", str(STEPS), "--logging_steps", "1", "--report_to", "none", "--save_strategy", "no",
        "--dataloader_num_workers", "0", "--disable_tqdm", "true", "--seed", "0", "--contrastive_weight", "0.5"])
    assert sum("contrastive_loss" in h for h in trainer.state.log_history) == STEPS
    del trainer

    # the host's mm_projector.bin == CLI `to-upstream` of its native checkpoint, bit for bit
    host_bin = run / "mm_projector.bin"
    conv_bin = tmp_path / "mm_projector.bin"
    assert convert.main(["to-upstream", str(run), str(conv_bin)]) == 0
    host_state, conv_state = torch.load(host_bin, weights_only=True), torch.load(conv_bin, weights_only=True)
    assert same_state(host_state, conv_state)

    nat = native_features(run, folder, names)
    native_state = convert.projector_state(nat["model"], upstream=False)
    fresh, _ = convert.build_native_llava(tiny_assets.llm_dir, tiny_assets.vision_dir)
    assert trained(convert.projector_state(fresh, upstream=False), native_state)

    up = upstream_features(stack_u_python, tiny_assets, host_bin, folder, names, tmp_path / "upstream.safetensors")
    compare(up, nat, "native->upstream", record_property)

    # native -> upstream -> native is bit-exact (files through the CLI, and loaded into a model)
    native_file, back_file = tmp_path / "native.safetensors", tmp_path / "back.safetensors"
    convert.save_state(native_state, native_file)
    assert convert.main(["to-upstream", str(native_file), str(tmp_path / "up.bin")]) == 0
    assert convert.main(["to-native", str(tmp_path / "up.bin"), str(back_file)]) == 0
    assert same_state(convert.load_state(back_file), native_state)
    convert.load_projector(fresh, tmp_path / "up.bin")
    assert same_state(convert.projector_state(fresh, upstream=False), native_state)


def test_stage2_pad_preprocessing(tiny_assets, stack_u_python, images, tmp_path, record_property):
    """Upstream stage 2 (`--image_aspect_ratio pad`) pads to a square of the mean colour before the
    CLIP processor; the native `LlavaImageProcessor(do_pad=True)` (PIL backend) gives the same pixels,
    while the plain CLIP processor of a stage-1 native checkpoint does not (on non-square images)."""
    from PIL import Image
    # the PIL backends, which AutoProcessor uses when torchvision is absent (as in stack M)
    from transformers import CLIPImageProcessorPil, LlavaImageProcessorPil

    folder, names = images
    up_bin = tmp_path / "mm_projector.bin"  # any projector: only the pixels are compared
    g = torch.Generator().manual_seed(0)
    torch.save({f"model.mm_projector.{i}.{p}": torch.randn((64, 64) if p == "weight" else (64,), generator=g)
                for i in (0, 2) for p in ("weight", "bias")}, up_bin)
    up = upstream_features(stack_u_python, tiny_assets, up_bin, folder, names, tmp_path / "pad.safetensors",
                           aspect="pad")
    pil = [Image.open(folder / n).convert("RGB") for n in names]
    padded = LlavaImageProcessorPil.from_pretrained(str(tiny_assets.vision_dir), do_pad=True)(pil, return_tensors="pt")
    plain = CLIPImageProcessorPil.from_pretrained(str(tiny_assets.vision_dir))(pil, return_tensors="pt")
    pad_diff = (padded["pixel_values"] - up["pixel_values"]).abs().max().item()
    plain_diff = (plain["pixel_values"] - up["pixel_values"]).abs().max().item()
    print(f"\n[pad] max abs pixel diff vs upstream pad: LlavaImageProcessor(do_pad) {pad_diff:.3g}, "
          f"CLIPImageProcessor {plain_diff:.3g}")
    record_property("pad", json.dumps({"llava_do_pad": pad_diff, "clip_plain": plain_diff}))
    assert torch.equal(padded["pixel_values"], up["pixel_values"])
    assert plain_diff > 0.1  # the non-square images differ without the padding
    # the native stage-2 entry (hosts/hf/finetune.py, --image_aspect_ratio pad) feeds the same pixels
    from llava_contrastive.hosts.hf.instruct_data import load_pixel_values

    clip = CLIPImageProcessorPil.from_pretrained(str(tiny_assets.vision_dir))
    stage2 = torch.stack([load_pixel_values(str(folder / n), clip, "pad") for n in names])
    assert torch.equal(stage2, up["pixel_values"])
