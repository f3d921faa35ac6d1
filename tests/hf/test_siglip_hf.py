"""The native host with a SigLIP vision tower (no class token: every token is a patch,
``vision_feature_select_strategy="full"``): the tiny SigLIP tower of ``python -m llava_contrastive.tiny
--vision siglip``, the joint loss against the core on the same embeddings, stage 1 trained and
loaded back with transformers' own classes, its projector loaded strictly into a new model."""
from __future__ import annotations

import json

import pytest
import torch

from hf.test_families_hf import train_four_steps
from hf.test_model import build, reference_embeddings
from llava_contrastive.core.losses import info_nce_loss


@pytest.fixture(scope="module")
def siglip_dir(tiny_assets):
    from llava_contrastive.dev.tiny import build_family_vision

    return build_family_vision(tiny_assets, "siglip")


@pytest.fixture(scope="module")
def siglip_native(tiny_assets, siglip_dir, tmp_path_factory):
    from llava_contrastive.hosts.hf.convert import build_native_llava

    out = tmp_path_factory.mktemp("native-siglip")
    build_native_llava(tiny_assets.llm_dir, siglip_dir, out)
    return out


def test_tower_is_siglip_and_every_token_is_a_patch(siglip_native):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(str(siglip_native))
    cfg = model.config
    assert cfg.vision_config.model_type == "siglip_vision_model"
    assert cfg.vision_feature_select_strategy == "full" and cfg.image_seq_length == 16
    processor = AutoProcessor.from_pretrained(str(siglip_native))
    from PIL import Image

    inputs = processor(images=Image.new("RGB", (64, 64), (30, 200, 30)), text="<image>\n", return_tensors="pt")
    assert int((inputs["input_ids"] == cfg.image_token_id).sum()) == 16
    with torch.no_grad():
        feats = model.get_image_features(pixel_values=inputs["pixel_values"])
    feats = getattr(feats, "pooler_output", feats)  # transformers 5: an output object of per-image tensors
    feats = feats[0] if isinstance(feats, (list, tuple)) else feats
    assert tuple(feats.reshape(-1, feats.shape[-1]).shape) == (16, cfg.text_config.hidden_size)


def test_joint_loss_equals_core_on_the_same_embeddings(tiny_assets, siglip_native):
    from transformers import AutoProcessor

    from llava_contrastive.hosts.hf.data import Collator, PretrainDataset

    processor = AutoProcessor.from_pretrained(str(siglip_native))
    records = json.loads(tiny_assets.pretrain_json.read_text())[:6]
    path = siglip_native / "records.json"
    path.write_text(json.dumps(records))
    ds = PretrainDataset(path, tiny_assets.image_folder, processor, image_seq_length=16)
    batch = Collator(processor.tokenizer.pad_token_id)([ds[i] for i in range(len(ds))])
    model = build(siglip_native, processor, contrastive_weight=0.5)
    out = model(**batch)
    image, text, keys = reference_embeddings(model, batch, class_tokens=0)
    expected = info_nce_loss(image, text, model.contrastive_head.logit_scale(), duplicate_keys=keys)
    torch.testing.assert_close(out.contrastive_loss, expected.detach(), atol=1e-6, rtol=1e-5)


def test_stage1_trains_saves_and_its_projector_loads_strictly(tiny_assets, siglip_dir, tmp_path):
    from transformers import LlavaForConditionalGeneration

    from llava_contrastive.hosts.hf.convert import build_native_llava

    out = tmp_path / "llava-siglip-tiny"
    train_four_steps(tiny_assets, tiny_assets.llm_dir, siglip_dir, out)
    saved = LlavaForConditionalGeneration.from_pretrained(str(out))
    assert saved.config.vision_feature_select_strategy == "full"
    # stage 2 starts from the stage-1 projector: strict load into a freshly assembled model
    fresh, _ = build_native_llava(tiny_assets.llm_dir, siglip_dir, projector=out / "mm_projector.bin")
    for name, p in saved.model.multi_modal_projector.state_dict().items():
        assert torch.equal(fresh.model.multi_modal_projector.state_dict()[name], p), name
