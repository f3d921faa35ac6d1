"""Stage 2 on the native host: LoRA (or QLoRA, 8-bit / 4-bit base) on the language model, projector
trained in full, contrastive term optional. The training entry is ``finetune.py``.

CPU trap handled here (bitsandbytes >= 0.49): on CPUs with AVX512-BF16, an eval-mode forward of a
``bnb.nn.Linear4bit`` without grad repacks its weight into an inference-only layout; every later
training forward then runs a kernel outside autograd and all gradients upstream of it are zero
(LoRA of earlier layers, the projector). ``disable_cpu_inference_repacking`` turns that off on
every 4-bit layer; ``load_stage2`` calls it.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch

# Full module names (transformers 5.x matches llm_int8_skip_modules against full names).
SKIP_QUANT = ["model.vision_tower", "model.multi_modal_projector", "lm_head"]
LORA_TARGETS = r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


def disable_cpu_inference_repacking(model) -> int:
    """Set ``support_avx512bf16_for_cpu = False`` on every ``bnb.nn.Linear4bit``; return how many."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    n = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def quantization_config(bits: int, compute_dtype: torch.dtype = torch.float32):
    """bitsandbytes config for the LLM only (vision tower, projector and lm_head stay unquantised)."""
    from transformers import BitsAndBytesConfig

    if bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_use_double_quant=True, llm_int8_skip_modules=list(SKIP_QUANT))
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(SKIP_QUANT))
    if bits == 16:
        return None
    raise ValueError(f"bits must be 16, 8 or 4, got {bits}")


def load_stage2(model_dir, bits: int = 16, lora_r: int = 8, lora_alpha: int = 16, lora_dropout: float = 0.0,
                projector: Optional[str] = None, model_class=None, fix_cpu_repacking: bool = True,
                dtype: torch.dtype = torch.float32, device_map=None):
    """Native (contrastive) LLaVA with LoRA adapters on the LLM; ``bits=8`` / ``bits=4`` load the LLM in
    int8 / NF4 (``dtype`` is then the compute dtype of the rest). The projector is trainable (full
    copy, ``modules_to_save``), the vision tower frozen. ``device_map`` applies to quantised loads
    (default: everything on the CPU). Returns the PEFT model."""
    from peft import LoraConfig, get_peft_model

    from llava_contrastive.hosts.hf.convert import freeze_fixed_projector_parts, load_projector
    from llava_contrastive.hosts.hf.model import ContrastiveLlavaForConditionalGeneration

    model_class = model_class or ContrastiveLlavaForConditionalGeneration
    kwargs = {"dtype": dtype}
    quant = quantization_config(bits, dtype)
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = device_map if device_map is not None else {"": "cpu"}
    model = model_class.from_pretrained(str(model_dir), **kwargs)
    if projector is not None:
        load_projector(model, projector)
    if bits == 4 and fix_cpu_repacking:
        disable_cpu_inference_repacking(model)
    model.requires_grad_(False)
    config = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=LORA_TARGETS,
                        modules_to_save=["multi_modal_projector"], bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    freeze_fixed_projector_parts(peft_model.get_base_model())  # the trainable copy's too
    return peft_model


def lora_parameters(model) -> Iterable[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if "lora_" in n]
