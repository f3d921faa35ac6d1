"""Upstream's ``linear`` projector on the native host: a stock LlavaForConditionalGeneration with
``projector_hidden_act="linear"`` and a frozen identity ``linear_2``; stage 1 -> mm_projector.bin with
upstream's linear keys -> stage 2 loads it strictly. Deeper mlpNx_gelu is refused by name."""
from __future__ import annotations

import glob
import json

import pytest
import torch
import torch.nn.functional as F

from llava_contrastive.hosts.hf import convert


def upstream_linear(vision_hidden=64, hidden=64, seed=3):
    g = torch.Generator().manual_seed(seed)
    return {"model.mm_projector.weight": torch.randn(hidden, vision_hidden, generator=g) * 0.2,
            "model.mm_projector.bias": torch.randn(hidden, generator=g) * 0.2}


def test_linear_round_trip_is_exact_and_collapses_a_trained_second_layer():
    up = upstream_linear()
    native = convert.upstream_to_native(up)
    assert torch.equal(native["model.multi_modal_projector.linear_1.weight"], up["model.mm_projector.weight"])
    assert torch.equal(native["model.multi_modal_projector.linear_2.weight"], torch.eye(64))
    assert not native["model.multi_modal_projector.linear_2.bias"].any()
    back = convert.native_to_upstream(native, projector_type="linear")
    assert sorted(back) == sorted(up) and all(torch.equal(back[k], up[k]) for k in up)
    # a second layer that moved (e.g. trained by someone else's code) is multiplied out, float64 reference
    g = torch.Generator().manual_seed(4)
    native["model.multi_modal_projector.linear_2.weight"] = torch.randn(64, 64, generator=g) * 0.1
    native["model.multi_modal_projector.linear_2.bias"] = torch.randn(64, generator=g)
    x = torch.randn(5, 64, generator=g, dtype=torch.float64)
    n = {k.rsplit(".", 2)[-2] + "." + k.rsplit(".", 1)[-1]: v.double() for k, v in native.items()}
    ref = F.linear(F.linear(x, n["linear_1.weight"], n["linear_1.bias"]), n["linear_2.weight"], n["linear_2.bias"])
    back = convert.native_to_upstream(native, projector_type="linear")
    got = F.linear(x, back["model.mm_projector.weight"].double(), back["model.mm_projector.bias"].double())
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert convert.upstream_projector_type(up) == "linear"


def test_native_linear_model_computes_upstreams_linear_projector(tiny_assets, tmp_path):
    """Built from upstream keys, saved, reloaded by transformers alone: image tokens = W x + b on
    CLIP hidden_states[-2][:, 1:] (upstream's linear projector), and the keys convert back bit for bit."""
    from PIL import Image
    from transformers import AutoProcessor, CLIPVisionModel, LlavaForConditionalGeneration

    up = upstream_linear()
    convert.build_native_llava(tiny_assets.llm_dir, tiny_assets.vision_dir, tmp_path / "native", projector=up)
    model = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "native"), dtype=torch.float32).eval()
    assert model.config.projector_hidden_act == "linear"
    processor = AutoProcessor.from_pretrained(str(tmp_path / "native"))
    images = [Image.open(p).convert("RGB") for p in sorted(glob.glob(str(tiny_assets.image_folder / "*" / "*.jpg")))[:2]]
    pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    tower = CLIPVisionModel.from_pretrained(str(tiny_assets.vision_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        native = torch.stack(list(model.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output))
        feats = tower(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
    expected = F.linear(feats, up["model.mm_projector.weight"], up["model.mm_projector.bias"])
    torch.testing.assert_close(native, expected, atol=1e-5, rtol=1e-5)
    back = convert.projector_state(model, upstream=True)
    assert sorted(back) == sorted(up) and all(torch.equal(back[k], up[k]) for k in up)
    # a linear projector does not load into an mlp2x_gelu model, and the error names the fix
    mlp, _ = convert.build_native_llava(tiny_assets.llm_dir, tiny_assets.vision_dir)
    with pytest.raises(ValueError, match="--mm_projector_type linear"):
        convert.load_projector(mlp, up)


def test_deeper_projectors_are_refused_with_the_fix(tiny_assets):
    with pytest.raises(ValueError, match="upstream host"):
        convert.build_native_llava(tiny_assets.llm_dir, tiny_assets.vision_dir, projector_type="mlp3x_gelu")


def test_preflight_refuses_mlp3x_on_the_native_host(tiny_assets, tmp_path):
    from llava_contrastive.training.preflight import NATIVE_PROJECTOR_TYPES, check_command

    assert set(NATIVE_PROJECTOR_TYPES) == set(convert.NATIVE_PROJECTOR_ACT)
    problems = check_command(["--llm_dir", str(tiny_assets.llm_dir), "--vision_dir", str(tiny_assets.vision_dir),
                              "--data_path", str(tiny_assets.pretrain_json), "--image_folder",
                              str(tiny_assets.image_folder), "--output_dir", str(tmp_path / "out"),
                              "--mm_projector_type", "mlp3x_gelu"], host="hf")
    errors = [p.message for p in problems if p.severity == "error"]
    assert len(errors) == 1 and "--mm_projector_type mlp3x_gelu" in errors[0] and "Fix:" in errors[0]


def test_linear_stage1_to_stage2_end_to_end(tiny_assets, tmp_path):
    """Stage 1 (both terms) trains linear_1 only; mm_projector.bin holds upstream's linear keys; the
    native checkpoint loads with stock transformers; stage 2 (LoRA) loads the projector strictly and
    keeps linear_2 the identity."""
    from transformers import LlavaForConditionalGeneration

    from llava_contrastive.hosts.hf import train
    from llava_contrastive.hosts.hf.lora import load_stage2

    out = tmp_path / "stage1"
    train.run(["--llm_dir", str(tiny_assets.llm_dir), "--vision_dir", str(tiny_assets.vision_dir),
               "--mm_projector_type", "linear", "--data_path", str(tiny_assets.pretrain_json),
               "--image_folder", str(tiny_assets.image_folder), "--output_dir", str(out),
               "--per_device_train_batch_size", "8", "--learning_rate", "1e-2", "--max_steps", "3",
               "--logging_steps", "1", "--report_to", "none", "--save_strategy", "no",
               "--dataloader_num_workers", "0", "--disable_tqdm", "true", "--seed", "0"])
    state = torch.load(out / "mm_projector.bin", weights_only=True)
    assert sorted(state) == ["model.mm_projector.bias", "model.mm_projector.weight"]
    assert state["model.mm_projector.weight"].shape == (64, 64)
    stock = LlavaForConditionalGeneration.from_pretrained(str(out))
    assert stock.config.projector_hidden_act == "linear"
    proj = stock.model.multi_modal_projector
    assert torch.equal(proj.linear_2.weight, torch.eye(64)) and not proj.linear_2.bias.any()
    fresh, _ = convert.build_native_llava(tiny_assets.llm_dir, tiny_assets.vision_dir, projector_type="linear", seed=0)
    assert not torch.equal(proj.linear_1.weight, fresh.model.multi_modal_projector.linear_1.weight)  # it trained
    assert json.loads((out / "config.json").read_text())["projector_hidden_act"] == "linear"

    convert.build_native_llava(tiny_assets.llm_dir, tiny_assets.vision_dir, tmp_path / "base",
                               projector=out / "mm_projector.bin")
    peft_model = load_stage2(tmp_path / "base", projector=str(out / "mm_projector.bin"))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad and "multi_modal_projector" in n}
    assert trainable and all("linear_1" in n for n in trainable)
    params = dict(peft_model.named_parameters())
    copy = [n for n in params if n.endswith("multi_modal_projector.modules_to_save.default.linear_1.weight")]
    assert len(copy) == 1 and torch.equal(params[copy[0]].detach(), state["model.mm_projector.weight"])
