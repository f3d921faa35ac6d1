"""Upstream mm_projector.bin <-> native LlavaForConditionalGeneration projector."""
from __future__ import annotations

import glob

import pytest
import torch
import torch.nn.functional as F

from llava_contrastive.hosts.hf import convert


def random_upstream_projector(vision_hidden=64, hidden=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {
        "model.mm_projector.0.weight": torch.randn(hidden, vision_hidden, generator=g) * 0.2,
        "model.mm_projector.0.bias": torch.randn(hidden, generator=g) * 0.2,
        "model.mm_projector.2.weight": torch.randn(hidden, hidden, generator=g) * 0.2,
        "model.mm_projector.2.bias": torch.randn(hidden, generator=g) * 0.2,
    }


def upstream_image_features(vision_dir, projector, pixel_values):
    """Upstream's definition, reimplemented: CLIP hidden_states[-2][:, 1:] -> Linear-GELU-Linear (fp32)."""
    from transformers import CLIPVisionModel

    tower = CLIPVisionModel.from_pretrained(str(vision_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        feats = tower(pixel_values.float(), output_hidden_states=True).hidden_states[-2][:, 1:]
        h = F.linear(feats, projector["model.mm_projector.0.weight"], projector["model.mm_projector.0.bias"])
        h = F.gelu(h)
        return F.linear(h, projector["model.mm_projector.2.weight"], projector["model.mm_projector.2.bias"])


def test_key_mapping_round_trip_exact():
    up = random_upstream_projector()
    native = convert.upstream_to_native(up)
    assert sorted(native) == sorted(f"model.multi_modal_projector.linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias"))
    back = convert.native_to_upstream(native)
    assert sorted(back) == sorted(up)
    for k in up:
        assert torch.equal(back[k], up[k])
    # 4.x-style native names and unprefixed upstream names are accepted too
    legacy = {k.replace("model.", "", 1): v for k, v in native.items()}
    assert all(torch.equal(convert.native_to_upstream(legacy)[k], up[k]) for k in up)
    bare = {k.replace("model.", "", 1): v for k, v in up.items()}
    assert sorted(convert.upstream_to_native(bare)) == sorted(native)


def test_rejects_other_projectors():
    with pytest.raises(KeyError):
        convert.upstream_to_native({"model.mm_projector.weight": torch.zeros(2, 2)})  # linear, no bias
    with pytest.raises(KeyError, match="mix"):
        convert.upstream_to_native({**random_upstream_projector(), "model.mm_projector.weight": torch.zeros(64, 64),
                                    "model.mm_projector.bias": torch.zeros(64)})
    with pytest.raises(KeyError):
        convert.upstream_to_native({"model.mm_projector.4.weight": torch.zeros(2, 2)})  # mlp3x
    with pytest.raises(KeyError):
        convert.upstream_to_native({"model.mm_projector.0.weight": torch.zeros(2, 2)})  # incomplete


def test_native_model_matches_upstream_formula(tiny_assets, native_dir, tmp_path):
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    up = random_upstream_projector()
    path = tmp_path / "mm_projector.bin"
    torch.save(up, path)
    native_file = tmp_path / "projector.safetensors"
    assert convert.main(["to-native", str(path), str(native_file)]) == 0

    model = LlavaForConditionalGeneration.from_pretrained(str(native_dir), dtype=torch.float32).eval()
    assert "model.multi_modal_projector.linear_1.weight" in model.state_dict()
    convert.load_projector(model, native_file)
    processor = AutoProcessor.from_pretrained(str(native_dir))
    images = [Image.open(p).convert("RGB") for p in sorted(glob.glob(str(tiny_assets.image_folder / "*" / "*.jpg")))[:3]]
    pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        native = model.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output
    native = torch.stack(list(native))
    expected = upstream_image_features(tiny_assets.vision_dir, up, pixel_values)
    assert native.shape == expected.shape == (3, 16, 64)
    torch.testing.assert_close(native, expected, atol=1e-5, rtol=1e-5)

    # ... and back: the model's projector is the upstream projector, bit for bit
    back = convert.projector_state(model, upstream=True)
    assert all(torch.equal(back[k], up[k]) for k in up) and sorted(back) == sorted(up)
    out = tmp_path / "back.bin"
    assert convert.main(["to-upstream", str(native_file), str(out)]) == 0
    reloaded = torch.load(out, weights_only=True)
    assert all(torch.equal(reloaded[k], up[k]) for k in up)


def test_saved_checkpoint_loads_offline_and_generates(tiny_assets, native_dir):
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(str(native_dir)).eval()
    processor = AutoProcessor.from_pretrained(str(native_dir))
    assert type(processor).__name__ == "LlavaProcessor"
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<image>")
    image = Image.open(sorted(glob.glob(str(tiny_assets.image_folder / "*" / "*.jpg")))[0]).convert("RGB")
    inputs = processor(images=image, text="<image>\n", return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == model.config.image_seq_length == 16
    out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 6


def test_fresh_projector_starts_like_upstream_and_follows_the_seed(tiny_assets):
    """Without a projector the native build starts it as upstream's stage 1 does (nn.Linear's
    kaiming-uniform weights and uniform biases, not transformers' normal(0, 0.02) with zero biases),
    from the given seed."""
    import math

    from llava_contrastive.hosts.hf.convert import build_native_llava

    a, _ = build_native_llava(tiny_assets.llm_dir, tiny_assets.vision_dir, seed=1)
    b, _ = build_native_llava(tiny_assets.llm_dir, tiny_assets.vision_dir, seed=1)
    c, _ = build_native_llava(tiny_assets.llm_dir, tiny_assets.vision_dir, seed=2)
    la, lb, lc = (m.model.multi_modal_projector.linear_1 for m in (a, b, c))
    assert torch.equal(la.weight, lb.weight) and not torch.equal(la.weight, lc.weight)
    bound = 1 / math.sqrt(la.in_features)  # nn.Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert float(la.weight.abs().max()) <= bound and float(la.weight.std()) > 0.8 * bound / math.sqrt(3)
    assert float(la.bias.abs().max()) > 0  # uniform biases, not zeros


@pytest.mark.parametrize("state, key", [
    ({f"model.mm_projector.{i}.{p}": torch.zeros(4, 4) if p == "weight" else torch.zeros(4)
      for i in (0, 2, 4) for p in ("weight", "bias")}, "model.mm_projector.4.weight"),  # mlp3x_gelu
])
def test_other_projector_types_are_refused_by_name(state, key):
    """The native projector has exactly two linear layers: mlpNx (N > 2) projectors do not convert."""
    with pytest.raises(KeyError, match="only linear and mlp2x_gelu"):
        convert.upstream_to_native(state)
    with pytest.raises(KeyError, match=key.replace(".", r"\.")):
        convert.upstream_to_native(state)
