"""ContrastiveLlavaForConditionalGeneration on a tiny batch: one pass, both losses, core values."""
from __future__ import annotations

import json

import pytest
import torch

from llava_contrastive.core.config import ContrastiveArguments
from llava_contrastive.core.losses import info_nce_loss, siglip_loss
from llava_contrastive.core.pooling import caption_keys, pool


@pytest.fixture(scope="module")
def setup(tiny_assets, native_dir):
    from transformers import AutoProcessor

    from llava_contrastive.hosts.hf.data import Collator, PretrainDataset

    processor = AutoProcessor.from_pretrained(str(native_dir))
    records = json.loads(tiny_assets.pretrain_json.read_text())[:6]
    records[3] = dict(records[1])  # a duplicate caption (masked as a negative by default)
    path = native_dir / "records.json"
    path.write_text(json.dumps(records))
    ds = PretrainDataset(path, tiny_assets.image_folder, processor, image_seq_length=16)
    batch = Collator(processor.tokenizer.pad_token_id)([ds[i] for i in range(len(ds))])
    return processor, batch


def build(native_dir, processor, **flags):
    from llava_contrastive.hosts.hf.model import ContrastiveLlavaForConditionalGeneration

    torch.manual_seed(0)
    model = ContrastiveLlavaForConditionalGeneration.from_pretrained(str(native_dir), dtype=torch.float32)
    model.requires_grad_(False)
    model.model.multi_modal_projector.requires_grad_(True)
    model.init_contrastive(ContrastiveArguments(**flags), processor)
    model.train()
    return model


def reference_embeddings(model, batch, class_tokens: int = 1, tokenizer=None):
    """Directly from the definition: projector(tower[-2] without its class token (CLIP: 1, SigLIP: 0))
    mean; caption input-embedding mean without the trailing "\n" separator. With ``tokenizer``, the
    last caption token is dropped only where it decodes to whitespace (a byte-level BPE such as
    Qwen2's merges ".\n" into one token, which then stays)."""
    cfg = model.config
    with torch.no_grad():
        hidden = model.model.vision_tower(batch["pixel_values"], output_hidden_states=True).hidden_states[-2]
        feats = hidden[:, class_tokens:]
    image = model.model.multi_modal_projector(feats).mean(1)
    ids, labels = batch["input_ids"], batch["labels"]
    mask = labels.ne(-100) & ids.ne(cfg.image_token_id)
    newline = model._separator_ids
    last = mask.long().cumsum(1).argmax(1)  # the last caption token is the "\n" separator
    if tokenizer is None:
        assert all(int(ids[r, last[r]]) in newline.tolist() for r in range(ids.shape[0]))
        mask[torch.arange(ids.shape[0]), last] = False
    else:
        for r in range(ids.shape[0]):
            if tokenizer.decode([int(ids[r, last[r]])]).strip() == "":
                mask[r, last[r]] = False
    text = pool(model.get_input_embeddings()(ids), mask, "mean")
    return image, text, caption_keys(ids, mask)


@pytest.mark.parametrize("loss", ["infonce", "siglip"])
def test_loss_equals_core_on_same_embeddings(native_dir, setup, loss):
    processor, batch = setup
    model = build(native_dir, processor, contrastive_weight=0.5, contrastive_loss=loss)
    out = model(**batch)
    image, text, keys = reference_embeddings(model, batch)
    scale = model.contrastive_head.logit_scale()
    if loss == "infonce":
        expected = info_nce_loss(image, text, scale, duplicate_keys=keys)
    else:
        expected = siglip_loss(image, text, scale, model.contrastive_head.logit_bias(), duplicate_keys=keys)
    torch.testing.assert_close(out.contrastive_loss, expected.detach(), atol=1e-6, rtol=1e-5)
    # NTP is the plain native loss of the same batch
    with torch.no_grad():
        plain = super(type(model), model).forward(**batch).loss
    torch.testing.assert_close(out.ntp_loss, plain, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.loss, out.ntp_loss + 0.5 * out.contrastive_loss, atol=1e-6, rtol=1e-6)
    assert float(out.contrastive_rows) == batch["input_ids"].shape[0]
    # gradients reach the projector and the logit scale, never the frozen LLM / tower
    out.loss.backward()
    assert model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0
    assert model.contrastive_head.scale.log_scale.grad is not None
    assert model.get_input_embeddings().weight.grad is None
    assert all(p.grad is None for p in model.model.vision_tower.parameters())


def test_one_vision_pass_and_weight_zero_is_native(native_dir, setup):
    processor, batch = setup
    model = build(native_dir, processor, contrastive_weight=0.5)
    calls = []
    handle = model.model.vision_tower.register_forward_hook(lambda *a: calls.append(1))
    model(**batch)
    handle.remove()
    assert len(calls) == 1
    off = build(native_dir, processor, contrastive_weight=0.0)
    out = off(**batch)
    assert getattr(out, "contrastive_loss", None) is None and out.loss is not None


def test_text_only_rows_have_no_pair(native_dir, setup):
    processor, batch = setup
    model = build(native_dir, processor, contrastive_weight=0.5)
    image_id = model.config.image_token_id
    ids = batch["input_ids"].clone()
    drop = 2  # row 2 becomes text-only: its image tokens turn into pads
    ids[drop][ids[drop] == image_id] = processor.tokenizer.pad_token_id
    keep = [r for r in range(ids.shape[0]) if r != drop]
    sub = {"input_ids": ids, "labels": batch["labels"], "attention_mask": batch["attention_mask"],
           "pixel_values": batch["pixel_values"][keep]}
    image, text, keys, rows, _ = model.embed_pairs(sub["input_ids"], sub["attention_mask"], sub["labels"],
                                                   sub["pixel_values"])
    assert rows.tolist() == keep
    ref_image, ref_text, _ = reference_embeddings(model, batch)
    torch.testing.assert_close(image, ref_image[keep].detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(text, ref_text[keep].detach(), atol=1e-6, rtol=1e-6)


def test_subclass_loads_every_native_weight(native_dir):
    """transformers 5.x skips its legacy-key renaming for classes outside transformers unless
    registered; lm_head would silently be re-initialised."""
    from transformers import LlavaForConditionalGeneration

    from llava_contrastive.hosts.hf.model import ContrastiveLlavaForConditionalGeneration

    ref = LlavaForConditionalGeneration.from_pretrained(str(native_dir)).state_dict()
    sub = ContrastiveLlavaForConditionalGeneration.from_pretrained(str(native_dir)).state_dict()
    assert sorted(ref) == sorted(sub)
    assert all(torch.equal(ref[k], sub[k]) for k in ref)


@pytest.mark.parametrize("flags", [
    {"contrastive_text_source": "llm"},
    {"contrastive_image_source": "llm"},
    {"contrastive_head": "linear", "contrastive_loss": "siglip"},
    {"contrastive_queue_size": 8},
])
def test_other_sources_run_through_the_core(native_dir, setup, flags):
    processor, batch = setup
    model = build(native_dir, processor, contrastive_weight=0.5, **flags)
    out = model(**batch)
    assert torch.isfinite(out.loss) and float(out.contrastive_loss) > 0
    out.loss.backward()
    assert model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0
    if flags.get("contrastive_image_source") == "llm":
        image, _, _, rows, _ = model.embed_pairs(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                                 batch["pixel_values"])
        with torch.no_grad():
            hidden = super(type(model), model).forward(**batch, output_hidden_states=True).hidden_states[-1]
        mask = batch["input_ids"].eq(model.config.image_token_id)
        torch.testing.assert_close(image, pool(hidden, mask, "mean")[rows], atol=1e-5, rtol=1e-5)
