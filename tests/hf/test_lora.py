"""Stage 2 LoRA / QLoRA (4-bit) on the native host: gradients stay non-zero after an eval step."""
from __future__ import annotations

import json

import pytest
import torch

from llava_contrastive.config import ContrastiveArguments

bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def batch(tiny_assets, native_dir):
    from transformers import AutoProcessor

    from llava_contrastive.hosts.hf.data import Collator, PretrainDataset

    processor = AutoProcessor.from_pretrained(str(native_dir))
    records = json.loads(tiny_assets.pretrain_json.read_text())[:4]
    path = native_dir / "lora_records.json"
    path.write_text(json.dumps(records))
    ds = PretrainDataset(path, tiny_assets.image_folder, processor, image_seq_length=16)
    return processor, Collator(processor.tokenizer.pad_token_id)([ds[i] for i in range(len(ds))])


def train_grads(model, batch):
    model.train()
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    return {n: (torch.zeros_like(p) if p.grad is None else p.grad.detach().clone())
            for n, p in model.named_parameters() if p.requires_grad}


def grads_before_and_after_eval_step(model, batch):
    """Training gradients, then an eval forward (no grad), then the same training gradients again
    (no optimizer step in between: they must not change)."""
    before = train_grads(model, batch)
    model.eval()
    with torch.no_grad():
        model(**batch)
    after = train_grads(model, batch)
    return before, after


def grads_after_eval_step(model, batch):
    return {n: float(g.abs().sum()) for n, g in grads_before_and_after_eval_step(model, batch)[1].items()}


def max_rel_change(before, after):
    return max(float((after[n] - before[n]).norm() / before[n].norm().clamp_min(1e-12)) for n in before)


def first_layer_lora_b(grads):
    return [v for n, v in grads.items() if "layers.0." in n and "lora_B" in n]


def projector_grads(grads):
    return [v for n, v in grads.items() if "multi_modal_projector" in n and "linear_1.weight" in n]


def build(native_dir, processor, bits, **kw):
    from llava_contrastive.hosts.hf.lora import load_stage2

    torch.manual_seed(0)
    model = load_stage2(native_dir, bits=bits, lora_r=4, **kw)
    target = model.get_base_model()
    target.init_contrastive(ContrastiveArguments(contrastive_weight=0.5), processor)
    # LoRA B starts at zero (A's gradient would be 0): give B a value so every LoRA grad is testable
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    return model


@pytest.mark.parametrize("bits", [16, 4])
def test_lora_grads_nonzero_after_eval_step(native_dir, batch, bits):
    processor, b = batch
    model = build(native_dir, processor, bits)
    if bits == 4:
        four = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert four and all(not m.support_avx512bf16_for_cpu for m in four)
        names = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert not any("vision_tower" in n or "multi_modal_projector" in n or "lm_head" in n for n in names)
    before, after = grads_before_and_after_eval_step(model, b)
    assert max_rel_change(before, after) < 1e-4
    grads = {n: float(g.abs().sum()) for n, g in after.items()}
    lora = {n: v for n, v in grads.items() if "lora_" in n}
    assert lora and all(v > 0 for v in lora.values()), [n for n, v in lora.items() if v == 0][:5]
    assert first_layer_lora_b(grads) and all(v > 0 for v in first_layer_lora_b(grads))
    assert projector_grads(grads) and all(v > 0 for v in projector_grads(grads))


def test_qlora_repacking_trap_forced(native_dir, batch, monkeypatch):
    """Force the AVX512-BF16 repacking path (as on such CPUs) without the fix: the eval step
    repacks the weights, later training forwards run a kernel outside autograd, and the gradients
    change (nothing flows through the repacked base weights any more). The fix above prevents it."""
    if not bnb.functional.has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: the inference repacking kernel cannot run here")
    processor, b = batch
    model = build(native_dir, processor, 4, fix_cpu_repacking=False)
    forced = []
    for n, m in model.named_modules():
        # the repacking kernel needs both sizes % 32 == 0 (the tiny MLP width 176 is not): attention only
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = m.out_features % 32 == 0 and m.in_features % 32 == 0  # forced where the kernel runs
            if m.support_avx512bf16_for_cpu:
                forced.append(n)
    assert forced
    before, after = grads_before_and_after_eval_step(model, b)
    assert max_rel_change(before, after) > 1e-2, "trap no longer reproduces: the fix may be obsolete"
