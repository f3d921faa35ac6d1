"""ContrastiveLlavaForCausalLM in-process on the tiny assets: every embedding source, the head,
the queue, gradient checkpointing, and the refusals."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from llava_contrastive.core.config import ContrastiveArguments
from llava_contrastive.core.losses import info_nce_loss


@pytest.fixture(scope="module")
def upstream(tiny_assets):
    import transformers
    from llava import conversation
    from llava.train import train as upstream_train

    tok = transformers.AutoTokenizer.from_pretrained(str(tiny_assets.llm_dir), use_fast=False,
                                                     model_max_length=96, padding_side="right")
    tok.pad_token = tok.unk_token
    saved = conversation.default_conversation
    conversation.default_conversation = conversation.conv_templates["plain"]
    yield SimpleNamespace(tok=tok, train=upstream_train, conversation=conversation)
    conversation.default_conversation = saved


def build(tiny_assets, upstream, model_class=None, **flags):
    from llava_contrastive.hosts.llava.model import ContrastiveLlavaForCausalLM

    torch.manual_seed(0)
    model = (model_class or ContrastiveLlavaForCausalLM).from_pretrained(str(tiny_assets.llm_dir))
    args = SimpleNamespace(vision_tower=str(tiny_assets.vision_dir), mm_vision_select_layer=-2,
                           mm_vision_select_feature="patch", pretrain_mm_mlp_adapter=None,
                           mm_patch_merge_type="flat", mm_projector_type="mlp2x_gelu")
    model.get_model().initialize_vision_modules(model_args=args)
    model.config.tokenizer_padding_side = "right"
    model.config.tokenizer_model_max_length = 96
    model.requires_grad_(False)
    for p in model.get_model().mm_projector.parameters():
        p.requires_grad_(True)
    model.init_contrastive(ContrastiveArguments(**flags), upstream.tok)
    model.train()
    return model


def make_batch(tiny_assets, upstream, records):
    vt = SimpleNamespace(image_processor=__import__("transformers").CLIPImageProcessor.from_pretrained(str(tiny_assets.vision_dir)))
    data_args = SimpleNamespace(image_folder=str(tiny_assets.image_folder), image_processor=vt.image_processor,
                                is_multimodal=True, mm_use_im_start_end=False, image_aspect_ratio="square")
    path = tiny_assets.root / "test_model_records.json"
    path.write_text(json.dumps(records))
    ds = upstream.train.LazySupervisedDataset(str(path), upstream.tok, data_args)
    collate = upstream.train.DataCollatorForSupervisedDataset(tokenizer=upstream.tok)
    return collate([ds[i] for i in range(len(ds))])


@pytest.fixture(scope="module")
def records(tiny_assets):
    return json.loads(tiny_assets.pretrain_json.read_text())[:6]


@pytest.fixture(scope="module")
def batch(tiny_assets, upstream, records):
    return make_batch(tiny_assets, upstream, records)


CONFIGS = {
    "default": {},
    "text_llm_prompteol": {"contrastive_text_source": "llm", "contrastive_prompt": "prompteol"},
    "text_llm_custom_mean_layer": {"contrastive_text_source": "llm", "contrastive_prompt": "A photo shows: {caption}",
                                   "contrastive_text_pooling": "mean", "contrastive_text_layer": -2},
    "text_llm_e5v": {"contrastive_text_source": "llm", "contrastive_prompt": "e5v"},
    "image_llm": {"contrastive_image_source": "llm"},
    "image_llm_last_layer1": {"contrastive_image_source": "llm", "contrastive_image_layer": 1,
                              "contrastive_image_pooling": "last"},
    "siglip": {"contrastive_loss": "siglip"},
    "linear_heads": {"contrastive_head": "linear", "contrastive_head_dim": 32},
    "queue": {"contrastive_queue_size": 16},
    "fixed_temperature": {"contrastive_learnable_temperature": False, "contrastive_temperature": 0.05},
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_source_trains_the_projector(tiny_assets, upstream, batch, name):
    model = build(tiny_assets, upstream, **CONFIGS[name])
    out = model(**batch)
    assert torch.isfinite(out.loss) and torch.isfinite(out.contrastive_loss)
    assert out.loss.item() == pytest.approx(out.ntp_loss.item() + 0.5 * out.contrastive_loss.item(), rel=1e-5)
    assert int(out.contrastive_rows) == 6
    out.loss.backward()
    for p in model.get_model().mm_projector.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    for n, p in model.contrastive_head.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert not any(p.grad is not None for p in model.get_model().embed_tokens.parameters())
    if name == "queue":
        assert int(model.contrastive_head.queue.filled) == 6  # enqueued after the loss


def test_contrastive_term_is_the_core_loss_on_embed_pairs(tiny_assets, upstream, batch):
    model = build(tiny_assets, upstream)
    out = model(**batch)
    image, text, keys, rows, ntp = model.embed_pairs(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                                     batch["images"])
    assert rows.tolist() == list(range(6))
    expected = info_nce_loss(image, text, model.contrastive_head.logit_scale(), duplicate_keys=keys)
    assert out.contrastive_loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert ntp.item() == pytest.approx(out.ntp_loss.item(), abs=1e-6)


def test_text_embedding_excludes_separator_and_image(tiny_assets, upstream, batch):
    model = build(tiny_assets, upstream)
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    caption = ids[labels.ne(-100)]
    decoded = upstream.tok.decode(caption)
    assert decoded.endswith("\n")
    _, text, *_ = model.embed_pairs(batch["input_ids"][:1], batch["attention_mask"][:1], batch["labels"][:1],
                                    batch["images"][:1])
    # mean of input embeddings over the caption without its trailing newline
    body = caption[:-1] if upstream.tok.decode(caption[-1:]).strip() == "" else caption
    manual = model.get_model().embed_tokens(body).mean(0)
    torch.testing.assert_close(text[0], manual, rtol=1e-5, atol=1e-6)


def test_rows_without_image_contribute_nothing(tiny_assets, upstream, records):
    """Stage-2-like batch: text-only rows get the collator's dummy image but no image token."""
    text_only = {"id": "t", "conversations": [{"from": "human", "value": "hi <image>"}, {"from": "gpt", "value": "a red circle."}]}
    mixed = make_batch(tiny_assets, upstream, records[:3] + [text_only])
    mixed["input_ids"][3][mixed["input_ids"][3] == -200] = upstream.tok.unk_token_id  # drop the image token
    model = build(tiny_assets, upstream)
    out = model(**mixed)
    assert int(out.contrastive_rows) == 3 and torch.isfinite(out.loss)


def test_gradient_checkpointing_same_loss_and_grads_single_capture(tiny_assets, upstream, batch):
    results = []
    for checkpointing in (False, True):
        model = build(tiny_assets, upstream, contrastive_image_source="llm")
        if checkpointing:
            model.gradient_checkpointing_enable()
            model.enable_input_require_grads()
        calls = []
        original = model.encode_images
        model.encode_images = lambda images: (calls.append(1), original(images))[1]
        out = model(**batch)
        out.loss.backward()
        assert len(calls) == 1  # captured once, never re-encoded (also not by checkpoint recomputation)
        results.append((out.loss.detach(), [p.grad.clone() for p in model.get_model().mm_projector.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def upstream_twin(upstream_class, assets, ours):
    """Upstream's own class on the same LLM, tower and projector weights as ``ours``."""
    theirs = upstream_class.from_pretrained(str(assets.llm_dir))
    theirs.get_model().initialize_vision_modules(model_args=SimpleNamespace(
        vision_tower=str(assets.vision_dir), mm_vision_select_layer=-2, mm_vision_select_feature="patch",
        pretrain_mm_mlp_adapter=None, mm_patch_merge_type="flat", mm_projector_type="mlp2x_gelu"))
    theirs.get_model().mm_projector.load_state_dict(ours.get_model().mm_projector.state_dict())
    theirs.config.tokenizer_model_max_length = 96
    return theirs


def test_weight_zero_is_upstream_forward(tiny_assets, upstream, batch):
    from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM

    ours = build(tiny_assets, upstream, contrastive_weight=0.0)
    theirs = upstream_twin(LlavaLlamaForCausalLM, tiny_assets, ours)
    assert ours(**batch).loss.item() == theirs(**batch).loss.item()


def test_refusals(tiny_assets, upstream):
    with pytest.raises(ValueError, match="mm_use_im_start_end"):
        from llava_contrastive.hosts.llava.model import ContrastiveLlavaForCausalLM

        model = ContrastiveLlavaForCausalLM.from_pretrained(str(tiny_assets.llm_dir))
        model.config.mm_use_im_start_end = True
        model.init_contrastive(ContrastiveArguments(), upstream.tok)
    with pytest.raises(ValueError, match="frozen text side"):
        ContrastiveArguments(contrastive_queue_size=8, contrastive_head="linear").validate()
    with pytest.raises(ValueError, match="contrastive_loss"):
        ContrastiveArguments(contrastive_loss="triplet").validate()
    with pytest.raises(ValueError, match="caption"):
        ContrastiveArguments(contrastive_text_source="llm", contrastive_prompt="no placeholder").validate()


def test_trainer_refuses_non_plain_template(upstream):
    from llava_contrastive.hosts.llava.trainer import _require_plain_template

    conv = upstream.conversation
    saved = conv.default_conversation
    conv.default_conversation = conv.conv_templates["v1"]
    try:
        with pytest.raises(ValueError, match="--contrastive_weight 0"):
            _require_plain_template()
    finally:
        conv.default_conversation = saved


def test_prompt_batch_equals_naive_concatenation():
    from llava_contrastive.core.prompts import build_prompt_batch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 50, (5, 9), generator=g)
    mask = torch.rand(5, 9, generator=g) > 0.4
    mask[2] = False
    mask[2, 4] = True
    for prefix, suffix, bos in (([7, 8], [9], 1), ([], [], None), ([4], [5, 6, 7], 1)):
        out, attention = build_prompt_batch(ids, mask, prefix, suffix, bos)
        for i in range(5):
            row = ([bos] if bos is not None else []) + prefix + ids[i][mask[i]].tolist() + suffix
            assert out[i, : len(row)].tolist() == row and attention[i].sum() == len(row)
            assert out[i, len(row):].eq(0).all()


def test_image_position_mask_matches_upstream_splice(tiny_assets, upstream, batch):
    """The positions the mask selects hold exactly the projected image tokens after upstream's
    prepare_inputs_labels_for_multimodal (right padding, rows of different lengths)."""
    from llava_contrastive.hosts.llava.model import image_position_mask, rows_with_one_image

    model = build(tiny_assets, upstream)
    model._capture_image_features = True
    _, _, new_mask, _, embeds, _ = model.prepare_inputs_labels_for_multimodal(
        batch["input_ids"], None, batch["attention_mask"], None, batch["labels"], batch["images"])
    features = model._captured_image_features
    model._capture_image_features = False
    valid, index = rows_with_one_image(batch["input_ids"])
    lengths = torch.full((batch["input_ids"].shape[0],), features.shape[1])
    mask = image_position_mask(batch["input_ids"], batch["attention_mask"], valid, lengths, embeds.shape[1],
                               new_mask, "right")
    for b in range(embeds.shape[0]):
        torch.testing.assert_close(embeds[b][mask[b]], features[int(index[b])])


def test_float32_tower_has_the_checkpoint_weights_after_upstreams_cast(tiny_assets, tmp_path):
    """Upstream's train() casts the tower to fp16 before the trainer exists; --vision_tower_dtype
    float32 (auto on CPU) must give the checkpoint's float32 weights back, not fp16-rounded ones."""
    from transformers import CLIPVisionModel

    from llava_contrastive.hosts.llava.image_features import build_upstream_model
    from llava_contrastive.hosts.llava.trainer import _set_vision_tower_dtype

    projector = tmp_path / "mm_projector.bin"
    torch.save({f"model.mm_projector.{i}.{p}": torch.zeros((64, 64) if p == "weight" else (64,))
                for i in (0, 2) for p in ("weight", "bias")}, projector)
    model = build_upstream_model(str(tiny_assets.llm_dir), str(tiny_assets.vision_dir), str(projector))
    tower = model.get_vision_tower()
    tower.to(dtype=torch.float16)  # what upstream's train() does
    _set_vision_tower_dtype(model, SimpleNamespace(vision_tower_dtype="float32", bf16=False))
    reference = CLIPVisionModel.from_pretrained(str(tiny_assets.vision_dir)).state_dict()
    got = tower.vision_tower.state_dict()
    assert tower.dtype == torch.float32
    assert all(torch.equal(got[k], v) for k, v in reference.items())
    # fp16 stays upstream's numerics: no reload when narrowing
    _set_vision_tower_dtype(model, SimpleNamespace(vision_tower_dtype="float16", bf16=False))
    assert tower.dtype == torch.float16
