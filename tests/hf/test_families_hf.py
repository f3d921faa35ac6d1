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
    # its stage-1 projector loads strictly into this family's stage 2 (LoRA; the projector's trainable copy)
    from llava_contrastive.hosts.hf.lora import load_stage2

    state = torch.load(out / "mm_projector.bin", weights_only=True)
    params = dict(load_stage2(out, projector=str(out / "mm_projector.bin")).named_parameters())
    copy = {n.split("modules_to_save.default.")[1]: p for n, p in params.items() if "modules_to_save.default." in n}
    assert sorted(copy) == ["linear_1.bias", "linear_1.weight", "linear_2.bias", "linear_2.weight"]
    assert torch.equal(copy["linear_1.weight"].detach(), state["model.mm_projector.0.weight"])
    assert torch.equal(copy["linear_2.weight"].detach(), state["model.mm_projector.2.weight"])


@pytest.mark.parametrize("family, tower, projector", [
    ("mistral", "clip", "mlp2x_gelu"), ("qwen2", "clip", "linear"), ("qwen2", "siglip", "mlp2x_gelu"),
    ("mistral", "siglip", "linear")])
def test_joint_loss_equals_core_for_each_family_tower_and_projector(tiny_assets, tmp_path, family, tower, projector):
    """One joint pass per LLM family / tower / projector: the contrastive term is the core's InfoNCE on
    embeddings computed from the definition (projector(tower[-2] patches) mean, caption embedding mean)."""
    import json

    from transformers import AutoProcessor

    from llava_contrastive.core.losses import info_nce_loss
    from llava_contrastive.dev.tiny import build_family_llm, build_family_vision
    from llava_contrastive.hosts.hf.convert import build_native_llava
    from llava_contrastive.hosts.hf.data import Collator, PretrainDataset
    from tests.hf.test_model import build, reference_embeddings

    native = tmp_path / "native"
    build_native_llava(build_family_llm(tiny_assets, family), build_family_vision(tiny_assets, tower), native,
                       projector_type=projector, seed=1)
    processor = AutoProcessor.from_pretrained(str(native))
    path = tmp_path / "records.json"
    path.write_text(json.dumps(json.loads(tiny_assets.pretrain_json.read_text())[:6]))
    ds = PretrainDataset(path, tiny_assets.image_folder, processor, image_seq_length=16)
    batch = Collator(processor.tokenizer.pad_token_id)([ds[i] for i in range(len(ds))])
    model = build(native, processor, contrastive_weight=0.5)
    assert model.config.text_config.model_type == family
    out = model(**batch)
    image, text, keys = reference_embeddings(model, batch, class_tokens=int(tower == "clip"),
                                             tokenizer=processor.tokenizer)
    if family == "qwen2":  # byte-level BPE, as Qwen2's: the caption's ".\n" is one token, not a separator
        last = batch["labels"][0][batch["labels"][0].ne(-100)][-1]
        assert processor.tokenizer.convert_ids_to_tokens(int(last)) == ".Ċ"
    expected = info_nce_loss(image, text, model.contrastive_head.logit_scale(), duplicate_keys=keys)
    torch.testing.assert_close(out.contrastive_loss, expected.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.loss, out.ntp_loss + 0.5 * out.contrastive_loss, atol=1e-6, rtol=1e-6)


def test_tiny_qwen2_has_a_qwen2_tokenizer(tiny_assets):
    """Byte-level BPE loaded by AutoTokenizer as transformers' Qwen2 tokenizer: no BOS, <|endoftext|> as
    end and padding, the ChatML template, text round-trips; its LLM's config carries those ids."""
    import json

    from transformers import AutoConfig, AutoTokenizer

    from llava_contrastive.dev.tiny import build_family_llm

    llm = build_family_llm(tiny_assets, "qwen2")
    tok = AutoTokenizer.from_pretrained(str(llm))
    assert type(tok).__name__.startswith("Qwen2Tokenizer")
    assert tok.bos_token_id is None and tok.eos_token == tok.pad_token == "<|endoftext|>"
    text = 'This sentence : "a small blue star in the top right corner." means in one word:"'
    assert tok.decode(tok(text).input_ids) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    cfg = AutoConfig.from_pretrained(str(llm))
    assert cfg.model_type == "qwen2" and cfg.eos_token_id == tok.eos_token_id and cfg.vocab_size == len(tok)
    assert json.loads((llm / "STAMP.json").read_text())["tokenizer"] == "qwen2 byte-level BPE"


def test_tiny_mistral_tokenizes_as_its_pretraining_tokenizer(tiny_assets):
    """transformers 5 loads a Mistral directory through its fast backend: with the tokenizer.json the
    tiny build writes, the ids equal those of the SentencePiece tokenizer the LLM was pretrained with
    (without it the first word of every caption got another id)."""
    import json

    from transformers import AutoTokenizer

    from llava_contrastive.dev.tiny import build_family_llm

    llm = build_family_llm(tiny_assets, "mistral")
    ours, reference = AutoTokenizer.from_pretrained(str(llm)), AutoTokenizer.from_pretrained(str(tiny_assets.llm_dir))
    texts = [r["conversations"][1]["value"] + "\n" for r in json.loads(tiny_assets.pretrain_json.read_text())[:200]]
    for special in (True, False):
        assert [ours(t, add_special_tokens=special).input_ids for t in texts] == \
            [reference(t, add_special_tokens=special).input_ids for t in texts]
