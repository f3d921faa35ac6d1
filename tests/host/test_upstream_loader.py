"""Every output directory this project writes loads with upstream's own
``llava.model.builder.load_pretrained_model`` in a process that never imports llava_contrastive
(as upstream's eval scripts, merge_lora_weights.py and lmms-eval load them), and generates."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.host import runs

# Runs in a fresh interpreter: upstream's loader the way upstream's eval scripts call it
# (model name from the path), on CPU; then one image question through upstream's prompt code.
UPSTREAM_LOAD = r'''
import json, sys
from PIL import Image
from llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from llava.conversation import conv_templates
from llava.mm_utils import get_model_name_from_path, process_images, tokenizer_image_token
from llava.model.builder import load_pretrained_model

model_path, model_base, image, conv_mode = sys.argv[1], sys.argv[2] or None, sys.argv[3], sys.argv[4]
name = get_model_name_from_path(model_path)
tokenizer, model, processor, _ = load_pretrained_model(model_path, model_base, name, device_map="cpu", device="cpu")
conv = conv_templates[conv_mode].copy()
conv.append_message(conv.roles[0], DEFAULT_IMAGE_TOKEN + "\nWhat is in the image?")
conv.append_message(conv.roles[1], None)
ids = tokenizer_image_token(conv.get_prompt(), tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt").unsqueeze(0)
img = Image.open(image).convert("RGB")
out = model.generate(ids, images=process_images([img], processor, model.config).to(model.dtype),
                     image_sizes=[img.size], do_sample=False, max_new_tokens=6, use_cache=True)
assert "llava_contrastive" not in sys.modules, sorted(m for m in sys.modules if m.startswith("llava_contrastive"))
print(json.dumps({"class": type(model).__name__, "new_tokens": int(out.shape[1]),
                  "text": tokenizer.batch_decode(out, skip_special_tokens=True)[0]}))
'''


def upstream_load(model_path: Path, model_base, image: Path, conv_mode: str) -> dict:
    env = runs.env()
    env.pop("PYTHONPATH", None)  # the project is not importable in this process
    proc = subprocess.run([sys.executable, "-c", UPSTREAM_LOAD, str(model_path), str(model_base or ""), str(image),
                           conv_mode], cwd="/", env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def first_image(assets) -> Path:
    record = next(r for r in json.loads(assets.instruct_json.read_text()) if "image" in r)
    return assets.instruct_image_folder / record["image"]


@pytest.mark.parametrize("which", ["stage1", "lora", "full"])
def test_upstream_loader_takes_every_output(which, request, tiny_assets):
    fixture, base, conv = {"stage1": ("stage1_dir", tiny_assets.llm_dir, "plain"),
                           "lora": ("stage2_lora_dir", tiny_assets.llm_dir, "vicuna_v1"),
                           "full": ("stage2_full_dir", None, "vicuna_v1")}[which]
    out = request.getfixturevalue(fixture)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llava_llama"
    assert config["architectures"] == ["LlavaLlamaForCausalLM"]
    expected_files = {"stage1": ["mm_projector.bin"], "lora": ["non_lora_trainables.bin", "adapter_config.json"],
                      "full": ["model.safetensors"]}[which]
    for name in expected_files:
        assert (out / name).is_file(), f"{which}: {name} missing in {sorted(p.name for p in out.iterdir())}"
    result = upstream_load(out, base, first_image(tiny_assets), conv)
    assert result["class"] == "LlavaLlamaForCausalLM"
    assert 1 <= result["new_tokens"] <= 7  # 6 new tokens (+ the start token 4.37 may put first)


def test_own_class_still_loads_stage2_full(stage2_full_dir):
    """The upstream-typed config.json still loads into our class (contrastive settings as data)."""
    import torch
    from safetensors.torch import load_file

    from llava_contrastive.hosts.llava.model import ContrastiveLlavaForCausalLM

    model = ContrastiveLlavaForCausalLM.from_pretrained(str(stage2_full_dir), torch_dtype=torch.float32)
    saved = load_file(str(stage2_full_dir / "model.safetensors"))
    state = model.state_dict()
    for key, value in saved.items():
        if key.startswith("model.vision_tower."):
            continue  # the tower is built lazily from its own directory (mm_vision_tower), as upstream does
        assert torch.equal(state[key], value), key
    assert any("mm_projector" in k for k in saved)
    assert model.config.to_dict()["model_type"] == "llava_llama"
