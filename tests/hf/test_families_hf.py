"""Native host with other LLM families: a tiny Mistral and a tiny Qwen2 (same tokenizer, corpus and
tower as the default Llama) train stage 1 with both terms, and the saved checkpoint loads with
transformers' own LlavaForConditionalGeneration / AutoProcessor and generates."""
from __future__ import annotations

import pytest
import torch


def train_four_steps(tiny_assets, llm_dir, vision_dir, out):
    """Stage 1 through the native entry, 4 steps of batch 8, both terms; asserts both were logged."""
    from llava_contrastive.hosts.hf import train

    trainer = train.run(["--llm_dir", str(llm_dir), "--vision_dir", str(vision_dir),
                         "--data_path", str(tiny_assets.pretrain_json), "--image_folder", str(tiny_assets.image_folder),
                         "--output_dir", str(out), "--per_device_train_batch_size", "8", "--learning_rate", "1e-3",
                         "--max_steps", "4", "--logging_steps", "1", "--report_to", "none", "--save_strategy", "no",
                         "--dataloader_num_workers", "0", "--disable_tqdm", "true", "--seed", "0"])
    logs = [h for h in trainer.state.log_history if "ntp_loss" in h]
    assert len(logs) == 4 and all(h["contrastive_loss"] > 0 and h["ntp_loss"] > 0 for h in logs)
    return trainer


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_stage1_on_another_family_loads_natively(tiny_assets, tmp_path, family):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from llava_contrastive.dev.tiny import build_family_llm

    llm = build_family_llm(tiny_assets, family)
    out = tmp_path / f"llava-{family}-tiny"
    train_four_steps(tiny_assets, llm, tiny_assets.vision_dir, out)
    model = LlavaForConditionalGeneration.from_pretrained(str(out))
    assert model.config.text_config.model_type == family
    processor = AutoProcessor.from_pretrained(str(out))
    from PIL import Image

    image = Image.new("RGB", (64, 64), (200, 30, 30))
    inputs = processor(images=image, text="<image>\n", return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert inputs["input_ids"].shape[1] < generated.shape[1] <= inputs["input_ids"].shape[1] + 3
