"""Stage-1 files: upstream's mm_projector.bin (exact keys), the contrastive head beside it, and
configs that upstream tools still load. Every file this project reads back is loaded with
``weights_only=True`` or safetensors."""
from __future__ import annotations

import os
from typing import Dict, Iterable, Tuple

import torch

from llava_contrastive.training.checkpointing import (HEAD_CONFIG_FILE, HEAD_FILE, PROJECTOR_FILE, atomic_torch_save,  # noqa: F401
                              atomic_write_text, load_head, load_projector_state, save_head)
from llava_contrastive.hosts.llava.compat import LlavaConfig, llava_trainer

PROJECTOR_KEYS = ("mm_projector", "vision_resampler")  # what upstream's checkpoint save matches


def gathered(named_params: Iterable[Tuple[str, torch.Tensor]], keys: Iterable[str]) -> Dict[str, torch.Tensor]:
    """CPU copies of the parameters whose name contains one of ``keys``, gathered under ZeRO-3
    (upstream's own helper, so the keys and shapes are exactly upstream's)."""
    return llava_trainer.get_mm_adapter_state_maybe_zero_3(named_params, list(keys))


def non_lora_trainables(named_params: Iterable[Tuple[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """CPU copies of the trainable parameters outside LoRA (the projector of a LoRA stage 2), as
    upstream's train() writes them to non_lora_trainables.bin (its own helper: same keys)."""
    from llava_contrastive.hosts.llava.compat import upstream_train_module

    return upstream_train_module().get_peft_state_non_lora_maybe_zero_3(named_params, require_grad_only=True)


def head_state(model) -> Dict[str, torch.Tensor]:
    """Parameters (gathered) and buffers (queue) of the contrastive head, keys relative to it."""
    head = model.contrastive_head
    params = gathered(head.named_parameters(), [""])
    buffers = {k: v.detach().cpu().clone() for k, v in head.named_buffers()}
    return {**params, **buffers}


def upstream_config_class(config) -> type:
    """Upstream's config class of the model's family (``LlavaConfig`` for Llama, ``LlavaMistralConfig``)."""
    return getattr(config, "upstream_config_class", LlavaConfig)


def upstream_config_dict(config) -> dict:
    """The model config as upstream's type of its family (``llava_llama``, ``llava_mistral``; contrastive
    settings kept as data)."""
    d = config.to_dict()
    d["model_type"] = upstream_config_class(config).model_type
    d["architectures"] = [getattr(config, "upstream_architecture", "LlavaLlamaForCausalLM")]
    return d


def save_stage1(model, output_dir: str, is_main: bool, use_im_start_end: bool = False) -> None:
    """mm_projector.bin (upstream keys), config.json (upstream type), and the contrastive head.
    Collective under ZeRO-3: every rank must call it."""
    keys = list(PROJECTOR_KEYS) + (["embed_tokens", "embed_in"] if use_im_start_end else [])
    projector = gathered(model.named_parameters(), keys)
    head = head_state(model) if getattr(model, "contrastive_head", None) is not None else None
    if not is_main:
        return
    os.makedirs(output_dir, exist_ok=True)
    upstream_config_class(model.config).from_dict(upstream_config_dict(model.config)).save_pretrained(output_dir)
    atomic_torch_save(projector, os.path.join(output_dir, PROJECTOR_FILE))
    if head is not None:
        save_head(head, model.contrastive_args.to_dict(), output_dir)


def expected_projector_shapes(projector_type: str, mm_hidden_size: int, hidden_size: int) -> Dict[str, tuple]:
    """Upstream's mm_projector parameter shapes (keys relative to mm_projector) for a projector type."""
    import re

    if projector_type == "linear":
        return {"weight": (hidden_size, mm_hidden_size), "bias": (hidden_size,)}
    match = re.match(r"^mlp(\d+)x_gelu$", projector_type)
    if not match:
        return {}  # identity / a fork's own type: nothing to check
    shapes = {}
    for i in range(int(match.group(1))):
        shapes[f"{2 * i}.weight"] = (hidden_size, mm_hidden_size if i == 0 else hidden_size)
        shapes[f"{2 * i}.bias"] = (hidden_size,)
    return shapes


def check_projector_file(path: str, projector_type: str, mm_hidden_size: int, hidden_size: int) -> None:
    """Fail before any model is built when --pretrain_mm_mlp_adapter does not fit the model."""
    state = load_projector_state(path)
    got = {k.split("mm_projector.", 1)[1]: tuple(v.shape) for k, v in state.items() if "mm_projector." in k}
    if not got:
        raise ValueError(f"{path}: no mm_projector weights in this file (keys: {sorted(state)[:5]})")
    want = expected_projector_shapes(projector_type, mm_hidden_size, hidden_size)
    if want and got != want:
        raise ValueError(
            f"{path}: projector weights {got} do not fit --mm_projector_type {projector_type} between a vision "
            f"tower of hidden size {mm_hidden_size} and an LLM of hidden size {hidden_size} (expected {want}). "
            "Use the projector trained for this LLM / vision tower / projector type.")


def load_stage1_weights(model, checkpoint_dir: str) -> None:
    """Restore projector (and head) from a stage-1 directory into ``model``, checking names and
    shapes with errors that name the file and the mismatch."""
    path = os.path.join(checkpoint_dir, PROJECTOR_FILE)
    state = load_projector_state(path)
    params = dict(model.named_parameters())
    missing = [k for k in params if any(m in k for m in PROJECTOR_KEYS) and k not in state]
    unexpected = [k for k in state if k not in params]
    if missing or unexpected:
        raise ValueError(f"{path}: keys do not match the model (missing {missing}, unexpected {unexpected})")
    for k, v in state.items():
        if tuple(params[k].shape) != tuple(v.shape) and params[k].numel() != 0:
            raise ValueError(f"{path}: {k} has shape {tuple(v.shape)}, the model expects {tuple(params[k].shape)} "
                             "(different --mm_projector_type, LLM or vision tower?)")
    with torch.no_grad():
        for k, v in state.items():
            params[k].data.copy_(v.to(params[k].dtype))
    if getattr(model, "contrastive_head", None) is not None:
        load_head(model, checkpoint_dir)
